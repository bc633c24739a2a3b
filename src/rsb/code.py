"""What "the code a stage runs" is, derived from the imports rather than typed: the modules of `rsb` that a stage's
command imports, followed through every `import` and `from ... import` (module level or inside a function; not under
`if TYPE_CHECKING:`), with the packages' __init__ files Python runs on the way.

One list, two users: the resume digest (rsb.checkpoint) hashes a training job's files, so a checkpoint written by
other code is never resumed; dvc.yaml and studies/dvc.yaml list, for every stage, the code its command runs (the
stage module, the launcher, every rsb module they import), so `dvc repro` reruns a stage whose code changed and no
other. `python -m rsb.code --write` writes those lists into both dvc.yaml files; tests/test_code.py fails when a file
differs from what it would write, and when the digest ignores a module. A stage that must not rerun for an unrelated
edit imports less (prepare reads its params section through rsb.paramfile, not rsb.config).

Left out by rule, and only it: `rsb.tracking`, which records numbers and changes none (its failures are caught and
turn tracking off; the resume digest must not make an MLflow fix restart a week of training).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from functools import cache
from pathlib import Path

import yaml

SRC = Path(__file__).resolve().parent.parent  # the folder that holds the `rsb` package (src/)
RECORDS_ONLY = ("rsb.tracking",)
JOBS = {"train": "rsb.trainer", "finetune": "rsb.finetune"}  # the job module each training stage runs
TRAINING_STAGES = tuple(f"stages.{s}" for s in JOBS)


def _file(module: str, src: Path = SRC) -> Path | None:
    base = Path(src).joinpath(*module.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _path(module: str, src: Path = SRC) -> Path:
    """The file of a module `modules` found (it exists)."""
    f = _file(module, src)
    assert f is not None, module
    return f


def _excluded(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in RECORDS_ONLY)


def _imports(path: Path, src: Path) -> set[str]:
    """The rsb modules a file imports (a `from pkg import name` counts pkg.name when that is a module)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "rsb")
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "rsb":
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names if _file(f"{child.module}.{a.name}", src))
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


@cache
def modules(root: str, src: Path = SRC) -> tuple[str, ...]:
    """`root` and every rsb module it imports, transitively, with each parent package; sorted (`src`: the folder
    holding the `rsb` package)."""
    seen: set[str] = set()
    todo = [root]
    while todo:
        m = todo.pop()
        parts = m.split(".")
        for name in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):  # rsb, rsb.data, rsb.loader
            if name in seen or _excluded(name) or _file(name, src) is None:
                continue
            seen.add(name)
            todo.extend(_imports(_path(name, src), src))
    return tuple(sorted(seen))


def files(root: str, src: Path = SRC) -> list[Path]:
    """The source files of `modules(root)`."""
    return [_path(m, src) for m in modules(root, Path(src))]


def repo_paths(root: str) -> list[str]:
    """`files(root)` as dvc.yaml names them: from the repository root (src/rsb/...)."""
    return [f.relative_to(SRC.parent).as_posix() for f in files(root)]


DVC_FILES = ("dvc.yaml", "studies/dvc.yaml")
MODULE = re.compile(r"^(stages|rsb)(\.\w+)+$")
CODE_DEP = re.compile(r"^(\s*)- (src/rsb/\S+\.py|stages/\w+\.py)\s*$")


def command_code(cmd: str) -> list[str]:
    """The code a stage's command runs, as dvc.yaml deps: each `stages.<x>` module's file and every rsb module it or
    an `rsb.<x>` module of the command (the launcher) imports; stage files first, then src/ sorted."""
    roots = [tok for tok in cmd.split() if MODULE.match(tok)]
    stage_files = [f"stages/{m.split('.', 1)[1]}.py" for m in roots if m.startswith("stages.")]
    rsb: set[str] = set()
    for f in stage_files:
        rsb.update(m for m in _imports(SRC.parent / f, SRC) if not _excluded(m))
    rsb.update(m for m in roots if m.startswith("rsb."))
    paths = {p for m in rsb for p in repo_paths(m)}
    return stage_files + sorted(paths)


def _stages(dvc_file: Path) -> dict[str, str]:
    """stage name -> cmd for every stage of a dvc.yaml whose command runs project code (foreach/matrix stages by
    their template)."""
    doc = yaml.safe_load(Path(dvc_file).read_text())
    cmds = {name: (s.get("do", s))["cmd"] for name, s in doc["stages"].items()}
    return {name: cmd for name, cmd in cmds.items() if any(MODULE.match(tok) for tok in cmd.split())}


def synced(dvc_file: Path) -> str:
    """`dvc_file`'s text with each stage's code deps replaced by `command_code` of its cmd (other deps, order of the
    rest and comments kept): the code deps sit where the stage listed its first one."""
    cmds, stage, done = _stages(dvc_file), None, False
    out: list[str] = []
    for line in Path(dvc_file).read_text().splitlines():
        head = re.match(r"^  ([\w-]+):\s*$", line)
        if head:  # a stage's first line: its code deps are rewritten (a stage running no project code: kept)
            stage, done = (head.group(1) if head.group(1) in cmds else None), False
        code = CODE_DEP.match(line)
        if code and stage:
            if not done:
                out.extend(f"{code.group(1)}- {dep}" for dep in command_code(cmds[stage]))
                done = True
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The code each stage runs: print it, or write it into the dvc.yaml files.")
    p.add_argument("--write", action="store_true", help="rewrite the code deps of dvc.yaml and studies/dvc.yaml")
    p.add_argument("--root", type=Path, default=SRC.parent)
    args = p.parse_args(argv)
    for name in DVC_FILES:
        f = args.root / name
        text = synced(f)
        if args.write and text != f.read_text():
            f.write_text(text)
            print(f"{f}: code deps rewritten")
        elif not args.write:
            for stage, cmd in _stages(f).items():
                print(f"{name}:{stage}: " + " ".join(command_code(cmd)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
