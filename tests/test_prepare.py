"""prepare: the mini release has the official structure, every label maps to the right class, bad input fails
clearly."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from conftest import TINY

from rsb.data import archives
from rsb.data.archives import ArchiveError
from rsb.data.datasets import Split
from rsb.data.index import ARCHIVES, DEVKIT, V2_TOP
from rsb.data.prepare import build
from rsb.data.spec import WNIDS


def members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else b"") for m in tar.getmembers()]


def rewrite(path: Path, items: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in items:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    raw = buf.getvalue()
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)


def file_info(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


# --- the release's structure -------------------------------------------------------------------------------------


def test_devkit_has_the_real_structure(release):
    raw, _ = release
    with tarfile.open(raw / ARCHIVES["devkit"]) as tar:
        names = set(tar.getnames())
        meta = sio.loadmat(tar.extractfile(f"{DEVKIT}/data/meta.mat"), squeeze_me=True)["synsets"]
    assert f"{DEVKIT}/data/ILSVRC2012_validation_ground_truth.txt" in names
    assert meta.dtype.names == (
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    )
    leaves = [m for m in meta if m["num_children"] == 0]
    assert sorted(int(m["ILSVRC2012_ID"]) for m in leaves) == list(range(1, TINY.classes + 1))
    assert any(m["num_children"] > 0 for m in meta), "the devkit also lists inner WordNet nodes"
    # ILSVRC2012_IDs are not the sorted-wnid order, as in the real devkit
    by_id = [str(m["WNID"]) for m in sorted(leaves, key=lambda m: int(m["ILSVRC2012_ID"]))]
    assert by_id != sorted(by_id)
    assert set(by_id) == {w for w, _ in WNIDS[: TINY.classes]}


def test_torchvision_reads_the_mini_devkit(release, tmp_path, monkeypatch):
    """The reference reader (torchvision.datasets.imagenet) parses our devkit; its md5 lock is the only thing off."""
    import torchvision.datasets.imagenet as tvi

    raw, _ = release
    shutil.copy(raw / ARCHIVES["devkit"], tmp_path)
    monkeypatch.setattr(tvi, "_verify_archive", lambda *a, **k: None)
    tvi.parse_devkit_archive(str(tmp_path))
    wnid_to_classes, val_wnids = tvi.load_meta_file(str(tmp_path))
    devkit = archives.load_devkit(raw / ARCHIVES["devkit"])
    assert val_wnids == devkit.val_wnids
    assert {w: tuple(c) for w, c in wnid_to_classes.items()} == devkit.names


def test_archives_are_in_the_official_layout(release):
    raw, summary = release
    outer = members(raw / ARCHIVES["train"])
    assert [m.name for m, _ in outer] == [f"{w}.tar" for w, _ in WNIDS[: TINY.classes]]
    inner = tarfile.open(fileobj=io.BytesIO(outer[0][1]))
    assert all(n.startswith(f"{WNIDS[0][0]}_") and n.endswith(".JPEG") for n in inner.getnames())
    val = [m.name for m, _ in members(raw / ARCHIVES["val"])]
    assert val == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, len(val) + 1)]
    v2 = {m.name.split("/")[1] for m, _ in members(raw / ARCHIVES["v2"]) if m.isfile()}
    assert v2 == {str(k) for k in range(TINY.classes)}
    assert all(m.name.startswith(V2_TOP + "/") for m, _ in members(raw / ARCHIVES["v2"]))
    real = json.loads((raw / ARCHIVES["real"]).read_text())
    assert len(real) == len(val) and any(len(r) > 1 for r in real) and any(r == [] for r in real)


def test_release_is_deterministic(release, tmp_path):
    from rsb.data.mini import write_release

    write_release(tmp_path, TINY)
    for name in ARCHIVES.values():
        assert (tmp_path / name).read_bytes() == (release[0] / name).read_bytes(), name


# --- labels --------------------------------------------------------------------------------------------------------


def test_train_labels_are_sorted_wnid_indices(prepared):
    ds = Split(prepared, "train")
    classes = json.loads((prepared / "classes.json").read_text())
    assert [c["wnid"] for c in classes] == sorted(c["wnid"] for c in classes)
    for path, label in ds.samples:
        assert classes[label]["wnid"] == path.parent.name
    assert classes[0] == {"index": 0, "wnid": "n01440764", "name": "tench", "words": ["tench", "Tinca tinca"]}
    assert len(ds) == TINY.classes * TINY.train_per_class + 2  # + the PNG and the CMYK quirk files


def test_val_labels_follow_the_devkit_ground_truth(prepared, release):
    """Through the devkit's ILSVRC2012_IDs, val file i gets exactly the class the generator drew it from."""
    _, summary = release
    truth = summary["val_labels"]
    ds = Split(prepared, "val")
    assert len(ds) == len(truth)
    for path, label in ds.samples:
        assert label == truth[int(path.stem.split("_")[-1]) - 1], path


def test_v2_labels_are_folder_indices(prepared):
    ds = Split(prepared, "v2")
    assert len(ds) == TINY.classes * TINY.v2_per_class
    assert all(label == int(path.parent.name) for path, label in ds.samples)
    assert sorted({label for _, label in ds.samples}) == list(range(TINY.classes))


def test_real_lists_map_to_val_files(prepared, release):
    from rsb.evaluation import real_labels

    raw, summary = release
    real = json.loads((raw / ARCHIVES["real"]).read_text())
    ds = Split(prepared, "val")
    lists = real_labels(ds)
    for (path, _label), got in zip(ds.samples, lists):
        assert got == real[int(path.stem.split("_")[-1]) - 1]
    # most ReaL lists contain the original label; the rest are relabelled, multi-object or unscored images
    assert np.mean([label in got for (_, label), got in zip(ds.samples, lists)]) > 0.8


def test_quirky_files_decode_as_rgb(prepared):
    ds = Split(prepared, "train")
    quirks = [i for i, (p, _) in enumerate(ds.samples) if p.stem.endswith(("_png", "_cmyk"))]
    assert len(quirks) == 2
    for i in quirks:
        img, _ = ds[i]
        assert img.mode == "RGB"
    png = next(i for i, (p, _) in enumerate(ds.samples) if p.stem.endswith("_png"))
    assert ds.read(png)[:4] == b"\x89PNG"


def test_prepare_is_idempotent(release, tmp_path):
    a = build(release[0], tmp_path / "prepared", "mini", False)
    b = build(release[0], tmp_path / "prepared", "mini", False)
    assert a == b and a["images"] == {"train": 162, "val": 80, "v2": 40}
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"], "no partial folders left behind"


# --- bad input -----------------------------------------------------------------------------------------------------


def _damage_missing(raw: Path) -> None:
    (raw / ARCHIVES["val"]).unlink()


def _damage_truncated(raw: Path) -> None:
    p = raw / ARCHIVES["train"]
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2 + 100])


def _damage_corrupt(raw: Path) -> None:
    p = raw / ARCHIVES["v2"]
    data = bytearray(p.read_bytes())
    data[100:400] = bytes(300)
    p.write_bytes(bytes(data))


def _damage_no_meta(raw: Path) -> None:
    p = raw / ARCHIVES["devkit"]
    rewrite(p, [(m, d) for m, d in members(p) if not m.name.endswith("meta.mat")])


def _damage_v2_folder(raw: Path) -> None:
    p = raw / ARCHIVES["v2"]
    rewrite(p, [(m, d) for m, d in members(p) if f"/{TINY.classes - 1}/" not in m.name])


def _damage_real_length(raw: Path) -> None:
    p = raw / ARCHIVES["real"]
    p.write_text(json.dumps(json.loads(p.read_text())[:-1]))


def _damage_image(raw: Path) -> None:
    p = raw / ARCHIVES["val"]
    items = members(p)
    items[3] = file_info(items[3][0].name, b"\xff\xd8\xff\xe0 this is not a JPEG")
    rewrite(p, items)


@pytest.mark.parametrize(
    "damage, message",
    [
        (_damage_missing, "missing ILSVRC2012_img_val.tar"),
        (_damage_truncated, "ILSVRC2012_img_train.tar"),
        (_damage_corrupt, "imagenetv2-matched-frequency.tar.gz"),
        (_damage_no_meta, "has no ILSVRC2012_devkit_t12/data/meta.mat"),
        (_damage_v2_folder, f"class folders missing (1, first: {TINY.classes - 1})"),
        (_damage_real_length, "79 entries, expected one label list per val image (80)"),
        (_damage_image, "image n"),
    ],
)
def test_bad_input_fails_clearly_and_leaves_nothing_complete(release_copy, tmp_path, damage, message):
    damage(release_copy)
    out = tmp_path / "out" / "prepared"
    with pytest.raises(ArchiveError) as err:
        build(release_copy, out, "mini", False)
    assert message in str(err.value)
    assert not out.exists()
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


@pytest.mark.parametrize("source", ["mini", "folder"])
def test_a_v2_without_every_class_is_refused_by_both_readers(release_copy, extracted, tmp_path, source):
    """The archives and an extracted folder go through one list of checks: a V2 missing its last class folder is
    refused by both, with the same words, naming what the user gave."""
    if source == "folder":
        raw = tmp_path / "extracted"
        shutil.copytree(extracted, raw)
        shutil.rmtree(raw / "v2" / str(TINY.classes - 1))
        named = raw / "v2"
    else:
        _damage_v2_folder(raw := release_copy)
        named = raw / ARCHIVES["v2"]
    with pytest.raises(ArchiveError) as err:
        build(raw, tmp_path / "prepared", source, False)
    assert str(err.value).startswith(f"{named}: class folders missing (1, first: {TINY.classes - 1}); ImageNetV2")


def test_failed_run_keeps_the_previous_complete_output(release_copy, tmp_path):
    out = tmp_path / "prepared"
    build(release_copy, out, "mini", False)
    before = (out / "info.json").read_text()
    _damage_image(release_copy)
    with pytest.raises(ArchiveError):
        build(release_copy, out, "mini", False)
    assert (out / "info.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "raw"]


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "hardlink", "device"])
def test_escaping_members_are_refused(release_copy, tmp_path, kind):
    p = release_copy / ARCHIVES["val"]
    items = members(p)
    if kind == "absolute":
        items.append(file_info("/tmp/evil.JPEG", b"x"))
    elif kind == "dotdot":
        items.append(file_info("../../evil.JPEG", b"x"))
    elif kind == "device":
        dev = tarfile.TarInfo("ILSVRC2012_val_99999999.JPEG")
        dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3  # /dev/null's numbers
        items.insert(1, (dev, b""))
    else:
        link = tarfile.TarInfo("ILSVRC2012_val_99999999.JPEG")
        link.type, link.linkname = (
            (tarfile.SYMTYPE, "/etc/passwd") if kind == "symlink" else (tarfile.LNKTYPE, items[0][0].name)
        )
        items.insert(1, (link, b""))
    rewrite(p, items)
    with pytest.raises(ArchiveError, match="refusing to extract"):
        build(release_copy, tmp_path / "prepared", "mini", False)
    assert not (tmp_path / "prepared").exists()
    assert not Path("/tmp/evil.JPEG").exists()


def test_imagenet_source_checks_official_counts(release, tmp_path):
    with pytest.raises(ArchiveError, match="expected the official 1000 / 50000"):
        build(release[0], tmp_path / "prepared", "imagenet", False)


def test_stage_flags_override_params(release, tmp_path):
    from stages.prepare import main

    info = main(["--raw", str(release[0]), "--out", str(tmp_path / "p"), "--source", "mini"])
    assert info["classes"] == TINY.classes and (tmp_path / "p" / "classes.json").is_file()


# --- the folder source: an extracted ImageNet, indexed in place ------------------------------------------------------


def test_an_extracted_folder_indexes_to_the_same_data(prepared, extracted, tmp_path):
    """`data.source: folder` over the release extracted by the standard library: the same images under the same
    names and labels, so the same content digest as indexing the archives, and the same decoded bytes."""
    info = build(extracted, tmp_path / "prepared", "folder", False)
    assert info["digest"] == json.loads((prepared / "info.json").read_text())["digest"]
    for split in ("train", "val", "v2"):
        a, b = Split(prepared, split), Split(tmp_path / "prepared", split)
        assert a.samples == b.samples
        assert all(a.read(i) == b.read(i) for i in range(0, len(a), 7))


def test_a_flat_val_folder_takes_its_labels_from_the_devkit(prepared, extracted, tmp_path):
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(extracted, raw)
    for f in list((raw / "val").rglob("*.JPEG")):
        f.rename(raw / "val" / f.name)
    for d in [d for d in (raw / "val").iterdir() if d.is_dir()]:
        d.rmdir()
    build(raw, tmp_path / "prepared", "folder", False)
    flat, nested = Split(tmp_path / "prepared", "val"), Split(prepared, "val")
    assert [(p.name, y) for p, y in flat.samples] == sorted((p.name, y) for p, y in nested.samples)


def test_prepared_is_an_index_not_a_copy(prepared, release):
    """No image is extracted: data/prepared holds a few small files, far smaller than the images it indexes."""
    files = sorted(p.name for p in prepared.iterdir())
    assert files == [
        ".rsb-output",
        "classes.json",
        "info.json",
        "real.json",
        "train.names.json.gz",
        "train.npz",
        "v2.names.json.gz",
        "v2.npz",
        "v2.tar",
        "val.names.json.gz",
        "val.npz",
    ]
    index = sum(p.stat().st_size for p in prepared.iterdir() if p.name != "v2.tar")
    assert index < 0.2 * sum(json.loads((prepared / "info.json").read_text())["bytes"].values())
