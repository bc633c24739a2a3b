"""Nothing lost, every mistake one line: no stage writes over or removes what it reads or did not create; every
reader checks what it reads; an expected failure is one `error: <file or key>: ...; <what to do>` line, no traceback.

Each case is a kind of slip (RELIABILITY.md, "Bad input"), tried on every stage it applies to; inputs are compared
byte for byte (sha256 of every file) before and after."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import timm
import torch
from conftest import ROOT, clean_env, write_params

from rsb import errors
from rsb.data import folder
from rsb.data.archives import ArchiveError
from rsb.data.index import ARCHIVES
from rsb.errors import InputError, RsbError
from rsb.io import load_weights, read_json, save_weights


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` (links followed) -> its sha256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def cli(cwd: Path, *args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(RSB_TRACKING="off", **env),
    )


def one_line(out: subprocess.CompletedProcess, *says: str) -> str:
    """The command failed with exit status 1 and one `error:` line (no traceback) that says each of `says`."""
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, out.stderr[-3000:]
    for s in says:
        assert s in lines[0], lines[0]
    return lines[0]


# --- inputs are never touched ------------------------------------------------------------------------------------


def _slips(raw: Path, tmp: Path) -> dict[str, Path]:
    """data.prepared values that overlap data.raw, as a user might type them; symlinks resolved."""
    (tmp / "link-to-raw").symlink_to(raw)
    (tmp / "link-to-parent").symlink_to(raw.parent)
    return {
        "equal": raw,
        "contains": raw.parent,
        "inside": raw / "prepared",
        "inside-deep": raw / "a" / "b",
        "symlink-equal": tmp / "link-to-raw",
        "symlink-inside": tmp / "link-to-raw" / "prepared",
        "symlink-contains": tmp / "link-to-parent",
        "dot-dot": raw / "x" / ".." / "..",
    }


@pytest.mark.parametrize(
    "slip",
    ["equal", "contains", "inside", "inside-deep", "symlink-equal", "symlink-inside", "symlink-contains", "dot-dot"],
)
@pytest.mark.parametrize("source", ["mini", "folder"])
def test_prepare_refuses_an_output_overlapping_the_archives_and_leaves_them_intact(
    release, extracted, tmp_path, slip, source
):
    from rsb.data.prepare import build

    raw = tmp_path / "datasets" / "imagenet"
    shutil.copytree(release[0] if source == "mini" else extracted, raw)
    before = tree_digest(raw.parent)
    out = _slips(raw, tmp_path)[slip]
    with pytest.raises(InputError, match=r"data.prepared = .*(is|lies inside|contains) the input data.raw"):
        build(raw, out, source, False)
    assert tree_digest(raw.parent) == before
    assert not list(raw.parent.glob(".*partial*")) and not list(raw.glob(".*partial*"))


def test_the_data_loss_slip_on_the_command_line(release, tmp_path):
    """`-S data.prepared=<the archives' folder>`: one line, before any work, archives' bytes unchanged."""
    raw = tmp_path / "imagenet"
    shutil.copytree(release[0], raw)
    before = tree_digest(raw)
    p = write_params(tmp_path / "params.yaml", raw, {"data.raw": str(raw), "data.source": "mini"})
    one_line(cli(tmp_path, "stages.prepare", "--params", str(p)), f"data.prepared = {raw}", "data.raw")
    assert tree_digest(raw) == before


def test_prepare_replaces_only_an_index_it_wrote(release, tmp_path):
    """An existing data.prepared that is not prepare's (no marker, not an index) is the user's: refused before any
    work, untouched. Its own earlier index, and an empty folder, are replaced."""
    from rsb.data.prepare import build

    theirs = tmp_path / "weights"
    theirs.mkdir()
    (theirs / "resnet50-a1.safetensors").write_bytes(b"GPU-days")
    with pytest.raises(InputError, match=r"weights: exists and was not written by prepare"):
        build(release[0], theirs, "mini", False)
    assert (theirs / "resnet50-a1.safetensors").read_bytes() == b"GPU-days"
    ours = tmp_path / "prepared"
    ours.mkdir()
    build(release[0], ours, "mini", False)
    first = read_json(ours / "info.json")
    assert build(release[0], ours, "mini", False)["digest"] == first["digest"]
    (ours / ".rsb-output").unlink()  # an index of a version before the marker: recognized by its files
    build(release[0], ours, "mini", False)
    link = tmp_path / "link"
    link.symlink_to(ours)
    with pytest.raises(InputError, match="is a symbolic link"):
        build(release[0], link, "mini", False)


def test_an_abandoned_partial_folder_is_removed_only_with_prepares_marker(release, tmp_path):
    from rsb.data.prepare import build

    out = tmp_path / "prepared"
    mine, theirs = tmp_path / ".prepared.partial-999999999-x", tmp_path / ".prepared.partial-999999998-y"
    mine.mkdir(), theirs.mkdir()
    (mine / ".rsb-output").write_text(json.dumps({"written_by": "prepare"}))
    (theirs / "keep").write_text("not prepare's")
    build(release[0], out, "mini", False)
    assert not mine.exists() and (theirs / "keep").read_text() == "not prepare's"


@pytest.mark.parametrize("flag", ["--out", "--downstream"])
def test_the_generators_never_write_into_a_folder_they_did_not_create(tmp_path, flag):
    """`python -m stages.mini` writes data.raw by default: pointed at real archives it must not replace them."""
    real = tmp_path / "imagenet"
    real.mkdir()
    (real / ARCHIVES["train"]).write_bytes(b"138 GB that cannot be downloaded again")
    before = tree_digest(real)
    one_line(cli(ROOT, "stages.mini", flag, str(real)), f"{flag} = {real}: exists and was not written by mini")
    assert tree_digest(real) == before
    assert [p.name for p in tmp_path.iterdir()] == ["imagenet"], "no partial folder left"


def test_a_start_never_overwrites_its_own_source(tmp_path, prepared, monkeypatch):
    """transfer.weights pointing at the start file the stage writes: refused, the file unchanged."""
    from stages.starts import main

    monkeypatch.chdir(tmp_path)
    src = tmp_path / "studies/transfer/starts/a1.safetensors"
    src.parent.mkdir(parents=True)
    save_weights(src, {"w": torch.ones(2)})
    before = src.read_bytes()
    p = write_params(
        tmp_path / "params.yaml",
        prepared,
        {"transfer.weights": {"a1": str(src)}, "transfer.starts": ["a1"], "transfer.arch": "test_resnet"},
    )
    with pytest.raises(InputError, match=r"is the input transfer.weights.a1"):
        main(["--name", "a1", "--params", str(p)])
    assert src.read_bytes() == before


@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_training_and_evaluation_refuse_outputs_inside_their_inputs(tmp_path, prepared, monkeypatch, stage):
    """data.raw = the project folder (where models/, metrics/ and checkpoints/ are written): refused before any work."""
    from stages.evaluate import main as evaluate
    from stages.train import main as train

    monkeypatch.chdir(tmp_path)
    p = write_params(tmp_path / "params.yaml", prepared, {"data.raw": str(tmp_path)})
    with pytest.raises(InputError, match=r"lies inside the input data.raw"):
        (train if stage == "train" else evaluate)(["--arch", "test_resnet", "--recipe", "a1", "--params", str(p)])
    assert sorted(x.name for x in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("stage", ["report", "studies"])
def test_reports_are_never_written_into_what_they_read(tmp_path, prepared, monkeypatch, stage):
    from stages.report import main as report
    from stages.studies import main as studies

    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics" / "eval").mkdir(parents=True)
    p = write_params(tmp_path / "params.yaml", prepared)
    with pytest.raises(InputError, match=r"--out = metrics: is the input"):
        report(["--params", str(p), "--out", "metrics"]) if stage == "report" else studies(
            ["seeds", "--params", str(p), "--out", "metrics"]
        )
    assert [x.name for x in (tmp_path / "metrics").rglob("*")] == ["eval"]


def test_overlap_is_decided_on_resolved_paths(tmp_path):
    from rsb.io import refuse_overlap

    (tmp_path / "a").mkdir()
    (tmp_path / "ab").mkdir()
    refuse_overlap({"out": tmp_path / "ab"}, {"in": tmp_path / "a"})  # a common prefix is not containment
    refuse_overlap({"out": tmp_path / "b"}, {"in": tmp_path / "a"})
    with pytest.raises(InputError, match="contains"):
        refuse_overlap({"out": tmp_path / "a" / ".."}, {"in": tmp_path / "a"})


# --- one error path ------------------------------------------------------------------------------------------------


def test_a_worker_side_failure_is_unwrapped_to_the_file(extracted, tmp_path):
    """An image removed, and one damaged, after indexing (folder source): the DataLoader worker's failure reaches
    the user as the file's line, not as 'Caught ... in DataLoader worker process 0' and its traceback."""
    from torch.utils.data import DataLoader

    from rsb.data.datasets import Split
    from rsb.data.prepare import build

    raw = tmp_path / "raw"
    shutil.copytree(extracted, raw)
    out = tmp_path / "prepared"
    build(raw, out, "folder", False)
    ds = Split(out, "train")
    victim = raw / "train" / ds.samples_names()[0]
    victim.write_bytes(b"\xff" * victim.stat().st_size)  # same size: only decoding can tell
    with pytest.raises(RsbError) as e:
        next(iter(DataLoader(ds, batch_size=2, num_workers=1, collate_fn=list)))
    assert "DataLoader worker" in str(e.value)
    line = errors.message(e.value)
    assert line.startswith(f"{raw / 'train'}: image {ds.samples_names()[0]} cannot be decoded"), line
    assert "\n" not in line and "Traceback" not in line
    victim.unlink()
    with pytest.raises(RsbError) as e:
        next(iter(DataLoader(ds, batch_size=2, num_workers=1, collate_fn=list)))
    assert errors.message(e.value).startswith(f"{victim}: cannot be read (No such file or directory)")


@pytest.mark.slow  # 8-20 s (a training process); the unwrapping itself is the fast test above
def test_a_training_whose_image_vanished_is_one_line(extracted, tmp_path):
    """The same through the stage's command line, with a loader worker: one line naming the file, exit 1."""
    from rsb.data.datasets import Split
    from rsb.data.prepare import build

    raw = tmp_path / "raw"
    shutil.copytree(extracted, raw)
    build(raw, tmp_path / "prepared", "folder", False)
    p = write_params(
        tmp_path / "params.yaml",
        tmp_path / "prepared",
        {"data.raw": str(raw), "data.source": "folder", "train.workers": 1},
    )
    for name in Split(tmp_path / "prepared", "train").samples_names():
        (raw / "train" / name).write_bytes(b"not an image")
        break
    for f in (raw / "train").rglob("*.JPEG"):  # every image broken: the first batch fails whatever its order
        f.write_bytes(b"\0" * f.stat().st_size)
    out = cli(tmp_path, "stages.train", "--arch", "test_resnet", "--recipe", "a1", "--params", str(p))
    one_line(out, f"{raw / 'train'}: image ", "cannot be decoded", "rank 0 of 1")


@pytest.mark.parametrize("devices", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2: ~12 s through deepspeed
def test_a_check_that_fails_inside_the_ranks_is_one_line_per_rank(tmp_path, prepared, devices):
    """A refusal raised inside a training process (a train set too small for one update of the global batch) is
    the one error line every refusal is, on each rank that raises it, naming the folder and the key to change; no
    traceback, exit 1, through the real launcher (deepspeed's for 2 processes)."""
    p = write_params(
        tmp_path / "params.yaml",
        prepared,
        {"scale.batch_size": 1024, "train.micro_batch": 512, "train.devices": devices, "train.precision": "fp32"},
    )
    out = cli(
        tmp_path,
        "rsb.launch",
        "--devices",
        str(devices),
        "stages.train",
        "--arch",
        "test_resnet",
        "--recipe",
        "a3",
        "--params",
        str(p),
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert sorted(ln.rsplit(" [", 1)[1] for ln in lines) == [f"rank {r} of {devices}]" for r in range(devices)], lines
    for ln in lines:
        assert f"{prepared}: 162 train images make no full update of batch 1024; lower scale.batch_size" in ln


def test_fp16_on_the_cpu_is_one_line_naming_the_key(tmp_path, prepared):
    """train.precision fp16 where no loss-scaled reference exists (the CPU) is refused in one line, as a key."""
    p = write_params(tmp_path / "params.yaml", prepared, {"train.precision": "fp16"})
    (tmp_path / "models").mkdir()
    save_weights(
        tmp_path / "models/test_resnet-a1.safetensors", timm.create_model("test_resnet", num_classes=20).state_dict()
    )
    one_line(
        cli(tmp_path, "stages.evaluate", "--arch", "test_resnet", "--recipe", "a1", "--params", str(p)),
        "train.precision = fp16 on the CPU",
        "use bf16 or fp32",
    )


@pytest.mark.parametrize("stage", ["train", pytest.param("evaluate", marks=pytest.mark.slow)])  # 9 s each
def test_a_temp_folder_too_long_for_worker_sockets_is_one_line_not_a_hang(tmp_path, prepared, stage):
    """Loader workers pass batches over a Unix socket under TMPDIR; past 107 bytes it cannot be bound, and without
    the check the worker's feeder thread died and the stage waited for its first batch forever."""
    tmp = tmp_path / ("t" * 90)
    tmp.mkdir()
    p = write_params(tmp_path / "params.yaml", prepared, {"train.workers": 1, "evaluate.workers": 1})
    if stage == "evaluate":
        import timm

        (tmp_path / "models").mkdir()
        save_weights(
            tmp_path / "models" / "test_resnet-a1.safetensors",
            timm.create_model("test_resnet", num_classes=20).state_dict(),
        )
    out = cli(
        tmp_path,
        f"stages.{stage}",
        "--arch",
        "test_resnet",
        "--recipe",
        "a1",
        "--params",
        str(p),
        timeout=120,
        TMPDIR=str(tmp),
    )
    one_line(out, f"TMPDIR = {tmp}: loader workers hand batches over a Unix socket", "set TMPDIR to a shorter")


def test_rsb_debug_shows_the_traceback(tmp_path):
    out = cli(tmp_path, "rsb.launch", "--devices", "0", "stages.train", RSB_DEBUG="1")
    assert out.returncode == 1 and "Traceback" in out.stderr and "ConfigError: --devices 0" in out.stderr


@pytest.mark.parametrize("damage", ["not-json", "merge-conflict", "binary"])
def test_a_json_file_the_project_wrote_and_something_broke_is_named(prepared, tmp_path, damage):
    from rsb.data.datasets import Split

    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    text = (copy / "info.json").read_text()
    broken = {
        "not-json": text[: len(text) // 2],
        "merge-conflict": f"<<<<<<< HEAD\n{text}=======\n{text}>>>>>>> theirs\n",
        "binary": None,
    }[damage]
    if broken is None:
        (copy / "info.json").write_bytes(b"\xff\xfe\x00garbage")
    else:
        (copy / "info.json").write_text(broken)
    with pytest.raises(InputError, match=rf"{copy / 'info.json'}: not (valid JSON|text)"):
        Split(copy, "val")


@pytest.mark.parametrize("part", ["val.npz", "val.names.json.gz"])
def test_a_damaged_index_is_named(prepared, tmp_path, part):
    from rsb.data.datasets import PreparedError, Split

    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    (copy / part).write_bytes((copy / part).read_bytes()[:40])
    with pytest.raises(PreparedError, match=r"(the val index is damaged|val.names.json.gz: unreadable).*dvc repro"):
        Split(copy, "val").samples_names()


def test_a_study_name_is_a_name_not_a_path(tmp_path, prepared, capsys):
    from stages.evaluate import main as evaluate
    from stages.train import main as train

    p = write_params(tmp_path / "params.yaml", prepared)
    for main in (train, evaluate):
        with pytest.raises(SystemExit) as e:
            main(["--arch", "test_resnet", "--recipe", "a1", "--params", str(p), "--study", "../.."])
        assert e.value.code == 2 and "invalid choice: '../..'" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["nan", "inf", "truncated", "pickle", "missing"])
def test_weights_are_checked_wherever_they_enter(tmp_path, damage):
    """Evaluate, the registry and backfill read weights through rsb.io.load_weights; starts through
    rsb.transfer.read_weights: both refuse non-finite values and unreadable files in one line."""
    from rsb.transfer import read_weights

    w = tmp_path / "m.safetensors"
    state = {"conv.weight": torch.randn(4, 3), "bn.num_batches_tracked": torch.tensor(3)}
    if damage in ("nan", "inf"):
        state["conv.weight"][1, 2] = float(damage)
    save_weights(w, state)
    if damage == "truncated":
        w.write_bytes(w.read_bytes()[:-7])
    elif damage == "pickle":
        torch.save(state, w)
    elif damage == "missing":
        w.unlink()
    says = {
        "nan": "tensor conv.weight holds NaN or infinite values",
        "inf": "tensor conv.weight holds NaN",
        "truncated": "not a readable safetensors",
        "pickle": "not a readable safetensors",
        "missing": "no such",
    }[damage]
    with pytest.raises(RsbError, match=f"{w}: {says}"):
        load_weights(w)
    with pytest.raises(RsbError, match=rf"{w}: ({says}|not a weights file this can read)"):
        read_weights(w)


def test_evaluate_refuses_weights_that_are_not_finite(tmp_path, prepared, monkeypatch):
    """The stage names the file and the tensor before any image is scored."""
    import timm

    from stages.evaluate import main

    monkeypatch.chdir(tmp_path)
    p = write_params(tmp_path / "params.yaml", prepared)
    state = timm.create_model("test_resnet", num_classes=20).state_dict()
    state["fc.bias"][0] = float("nan")
    save_weights(tmp_path / "models" / "test_resnet-a1.safetensors", state)
    with pytest.raises(InputError, match="models/test_resnet-a1.safetensors: tensor fc.bias holds NaN or infinite"):
        main(["--arch", "test_resnet", "--recipe", "a1", "--params", str(p)])
    assert not (tmp_path / "metrics").exists()


def test_an_occupied_port_is_refused_before_any_process_starts(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = cli(tmp_path, "rsb.launch", "--devices", "2", "--master-port", str(port), "stages.train", "--arch", "x")
        one_line(out, f"train.master_port={port}: in use on this node")
    assert "deepspeed" not in out.stdout.lower()


def test_an_occupied_ui_port_is_refused_before_mlflow_starts(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        one_line(cli(tmp_path, "rsb.tracking", "ui", "--port", str(port)), f"--port={port}: in use on this node")


@pytest.mark.parametrize(
    "args, says",
    [
        (["--devices", "0"], "--devices 0: must be an integer >= 1"),
        (["--nodes", "-1"], "--nodes -1: must be an integer >= 1"),
        (["--master-port", "70000"], "--master-port 70000: must be an integer in [0, 65535]"),
        (["--launcher", "ssh"], "--launcher 'ssh': must be one of pdsh, no_ssh, slurm"),
    ],
)
def test_launcher_options_go_through_their_keys_domains(tmp_path, args, says):
    one_line(cli(tmp_path, "rsb.launch", *args, "stages.train", "--arch", "x"), says)


def test_a_seed_outside_its_domain_is_refused_on_the_command_line(tmp_path, prepared):
    from rsb.config import ConfigError
    from stages.evaluate import main as evaluate
    from stages.train import main as train

    p = write_params(tmp_path / "params.yaml", prepared)
    for main in (train, evaluate):
        with pytest.raises(ConfigError, match=re.escape("--seed -3: must be an integer in [0, 2147483647]")):
            main(["--arch", "test_resnet", "--recipe", "a1", "--params", str(p), "--seed", "-3"])


def test_an_unreachable_mlflow_server_fails_in_seconds_naming_the_url(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    t0 = time.monotonic()
    out = cli(tmp_path, "rsb.tracking", "backfill", MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 30
    one_line(out, f"MLflow at http://127.0.0.1:{port}:", "start the server")


# --- no network call the user did not configure ------------------------------------------------------------------


def test_dvc_sends_no_analytics_and_checks_no_updates(tmp_path):
    """The committed .dvc/config turns DVC's analytics (a report file in the temp folder, then a send) and its
    update check off: a `dvc` command leaves nothing in TMPDIR."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", tmp_path / ".dvc" / "config")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_NO_ANALYTICS", "DO_NOT_TRACK")}
    subprocess.run(["dvc", "status"], cwd=tmp_path, env={**env, "TMPDIR": str(tmp)}, capture_output=True, timeout=120)
    assert list(tmp.iterdir()) == []


def test_mlflow_telemetry_and_job_runner_are_off_wherever_the_project_starts_mlflow():
    """As MLflow reads them, in a process that imported rsb.tracking (and so in the `mlflow ui` it starts)."""
    code = (
        "import os, rsb.tracking; from mlflow.telemetry.utils import is_telemetry_disabled; "
        "from mlflow.environment_variables import MLFLOW_SERVER_ENABLE_JOB_EXECUTION as jobs; "
        "print(os.environ['MLFLOW_DISABLE_TELEMETRY'], is_telemetry_disabled(), jobs.get())"
    )
    env = {
        k: v
        for k, v in clean_env().items()
        if k not in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION")
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["true", "True", "False"], out.stderr[-2000:]


# --- every reader checks what it reads --------------------------------------------------------------------------


def _val_tar_with(raw: Path, edit: str) -> None:
    """Rewrite the val tar with one member repeated, dropped, or added beyond the devkit's ground truth."""
    path = raw / ARCHIVES["val"]
    with tarfile.open(path) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    if edit == "repeated":
        members.append(members[3])
    elif edit == "missing":
        del members[5]
    elif edit == "extra":
        m = tarfile.TarInfo(f"ILSVRC2012_val_{len(members) + 1:08d}.JPEG")
        m.size = len(members[0][1])
        members.append((m, members[0][1]))
    with tarfile.open(path, "w") as t:
        for m, data in members:
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            t.addfile(info, __import__("io").BytesIO(data))


@pytest.mark.parametrize(
    "edit, says",
    [
        ("repeated", "appears more than once"),
        ("missing", "val image(s) of the devkit's ground truth missing (first: ILSVRC2012_val_00000006.JPEG)"),
        ("extra", "member ILSVRC2012_val_00000081.JPEG has no ground truth in the devkit"),
    ],
)
def test_val_members_are_the_devkits_ids_exactly(release_copy, tmp_path, edit, says):
    from rsb.data.prepare import build

    _val_tar_with(release_copy, edit)
    with pytest.raises(ArchiveError, match=rf"{ARCHIVES['val']}: .*{__import__('re').escape(says)}"):
        build(release_copy, tmp_path / "prepared", "mini", False)
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize(
    "edit, says",
    [
        ("moved", "but the devkit's ground truth says"),
        ("missing", "missing (first: ILSVRC2012_val_"),
        ("renamed", "is not ILSVRC2012_val_<8 digits>.JPEG"),
    ],
)
def test_an_extracted_val_folder_is_checked_against_the_devkit(extracted, tmp_path, edit, says):
    from rsb.data.prepare import build

    raw = tmp_path / "raw"
    shutil.copytree(extracted, raw)
    classes = sorted(d for d in (raw / "val").iterdir())
    victim = sorted(classes[0].iterdir())[0]
    if edit == "moved":
        victim.rename(classes[1] / victim.name)
    elif edit == "missing":
        victim.unlink()
    else:
        victim.rename(victim.with_name("val_1.JPEG"))
    with pytest.raises(ArchiveError, match=__import__("re").escape(says)):
        build(raw, tmp_path / "prepared", "folder", False)


# Damages to an ImageFolder split, and what both readers (prepare's folder source, a downstream dataset) do.
FOLDER_CASES = {
    "hidden files and folders": (
        lambda top, c: [
            (top / ".DS_Store").write_bytes(b"x"),
            (c / "._0000.JPEG").write_bytes(b"x"),
            (top / ".ipynb_checkpoints").mkdir(),
        ],
        None,
    ),
    "a README in a class folder": (lambda top, c: (c / "README.txt").write_text("x"), "not an image file"),
    "a file directly under the split": (lambda top, c: (top / "notes.JPEG").write_bytes(b"x"), "a file directly under"),
    "an empty class folder": (lambda top, c: (top / "zz-empty").mkdir(), "no images"),
    "an upper-case extension": (lambda top, c: next(c.iterdir()).rename(c / "UPPER.JPG"), None),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_every_imagefolder_source_refuses_and_skips_the_same_things(case, extracted, downstream, tmp_path):
    from rsb.data.prepare import build

    damage, says = FOLDER_CASES[case]
    raw, ds = tmp_path / "raw", tmp_path / "patterns"
    shutil.copytree(extracted, raw)
    shutil.copytree(downstream / "patterns", ds)
    damage(raw / "train", sorted((raw / "train").iterdir())[0])
    damage(ds / "train", sorted((ds / "train").iterdir())[0])
    if says is None:
        build(raw, tmp_path / "prepared", "folder", False)
        info = folder.check(ds)
        assert len(folder.Folder(ds, "train")) == info["images"]["train"], "what is trained is what was checked"
        return
    with pytest.raises(ArchiveError, match=says):
        build(raw, tmp_path / "prepared", "folder", False)
    with pytest.raises(folder.FolderError, match=says):
        folder.check(ds)


@pytest.fixture(scope="module")
def downstream(tmp_path_factory) -> Path:
    from rsb.data.downstream import write_downstream

    out = tmp_path_factory.mktemp("downstream")
    write_downstream(out, 0, 32, 3, 2)
    return out


@pytest.mark.parametrize(
    "aa", ["rand-m9-mstd-inc1", "rand-m9--inc1", "rand-m9-foo-mstd0.5", "original-mstd", "augmix-m5-x"]
)
def test_an_augmentation_segment_timm_would_skip_is_refused(tmp_path, prepared, aa):
    """timm's parsers skip a segment with no digit without a word (the run trains with the default); refused."""
    from rsb.config import ConfigError, check_timm, load_params

    p = write_params(tmp_path / "params.yaml", prepared, {"recipes.a1.aa": aa})
    with pytest.raises(ConfigError, match=rf"recipes.a1.aa = '{aa}': must be null"):
        check_timm(load_params(p), str(p))
