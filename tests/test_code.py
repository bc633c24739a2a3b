"""rsb.code: the one list of what a stage depends on, derived from the imports; the DVC deps of every stage and the
training's resume digest both follow it (the digest's side: test_checkpoint.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, clean_env

from rsb import code


def test_the_derived_list_is_what_python_imports():
    """The AST walk against Python itself: every rsb module a training job's import loads (tracking aside) is in the
    list, compat.py included (it patches timm's posterize at import, so it changes what training does)."""
    for job in code.JOBS.values():
        probe = (
            f"import sys, {job}; print(__import__('json').dumps(sorted(m for m in sys.modules if m.startswith('rsb'))))"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            check=True,
            env=clean_env(PYTHONPATH=str(ROOT / "src")),
            cwd=ROOT,
        )
        loaded = {m for m in json.loads(out.stdout) if not m.startswith("rsb.tracking")}
        assert loaded <= set(code.modules(job)), loaded - set(code.modules(job))
        assert {"rsb.compat", "rsb.training", "rsb.engine", "rsb.loader", "rsb.hardware"} <= set(code.modules(job))
        assert not [m for m in code.modules(job) if m.startswith("rsb.tracking")], "records only: left out by rule"


@pytest.mark.parametrize("dvc_file", code.DVC_FILES)
def test_every_stage_lists_the_code_it_runs(dvc_file):
    """dvc.yaml and studies/dvc.yaml are what `python -m rsb.code --write` writes: a stage that misses a module its
    command imports (or lists one it no longer does) fails here, naming the fix. Every stage that runs project code
    is derived; the training stages list their job's whole closure and the launcher."""
    path = ROOT / dvc_file
    assert code.synced(path) == path.read_text(), f"{dvc_file}: run `python -m rsb.code --write`"
    stages = {n: s.get("do", s) for n, s in yaml.safe_load(path.read_text())["stages"].items()}
    assert set(code._stages(path)) == {n for n, s in stages.items() if "python -m " in s["cmd"]}, "every stage"
    training = [s for s in stages.values() if "stages.train " in s["cmd"] or "stages.finetune " in s["cmd"]]
    assert training, dvc_file
    for s in training:
        job = code.JOBS["finetune" if "stages.finetune " in s["cmd"] else "train"]
        assert set(code.repo_paths(job)) | {"src/rsb/launch.py"} <= set(s["deps"])


def test_evaluate_follows_config_and_prepare_imports_none_of_it():
    """evaluate resolves the test size and precision through rsb.config: config.py is one of its deps. prepare
    (hours over ImageNet) reads its params section through rsb.paramfile and imports no training code."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert "src/rsb/config.py" in stages["evaluate"]["deps"]
    prepare = stages["prepare"]["deps"]
    assert "src/rsb/paramfile.py" in prepare
    assert not {"src/rsb/config.py", "src/rsb/hardware.py", "src/rsb/engine.py"} & set(prepare), prepare


@pytest.mark.parametrize(
    "stage, module",
    [("train", "src/rsb/compat.py"), ("evaluate", "src/rsb/config.py"), ("prepare", "src/rsb/paramfile.py")],
)
def test_a_stage_missing_a_module_is_caught(tmp_path, stage, module):
    """The check above can fail: dvc.yaml with a module dropped from a stage is rewritten with it."""
    text = (ROOT / "dvc.yaml").read_text()
    at = text.index(f"\n  {stage}:\n")
    line = f"      - {module}\n"
    cut = text.index(line, at)
    broken = tmp_path / "dvc.yaml"
    broken.write_text(text[:cut] + text[cut + len(line) :])
    assert code.synced(broken) != broken.read_text()
    assert code.synced(broken) == text


def test_imports_inside_functions_count_and_type_only_ones_do_not(tmp_path):
    """A module a function imports runs when training calls it (config imports rsb.hardware so); one imported only
    for type annotations (`if TYPE_CHECKING:`) never runs."""
    pkg = tmp_path / "rsb"
    (pkg / "data").mkdir(parents=True)
    for f in ("__init__.py", "data/__init__.py", "late.py", "typed.py", "data/leaf.py", "tracking.py"):
        (pkg / f).write_text("")
    (pkg / "job.py").write_text(
        "from typing import TYPE_CHECKING\nfrom rsb.data import leaf\nimport rsb.tracking\n"
        "if TYPE_CHECKING:\n    from rsb import typed\n\n"
        "def f():\n    from rsb import late\n"
    )
    code.modules.cache_clear()
    assert code.modules("rsb.job", tmp_path) == ("rsb", "rsb.data", "rsb.data.leaf", "rsb.job", "rsb.late")
