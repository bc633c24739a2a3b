"""The miniature ImageNet release: the official archive formats, generated from a seed.

`write_release(out, MiniSpec())` writes exactly the files a user downloads for the real thing, so `prepare` runs the
same indexing and reading code on both:

    ILSVRC2012_img_train.tar          one inner tar per class (n01440764.tar ...), members <wnid>_<n>.JPEG
    ILSVRC2012_img_val.tar            flat ILSVRC2012_val_%08d.JPEG
    ILSVRC2012_devkit_t12.tar.gz      data/meta.mat (the devkit's `synsets` struct) and
                                      data/ILSVRC2012_validation_ground_truth.txt (1-based ILSVRC2012_IDs)
    imagenetv2-matched-frequency.tar.gz   imagenetv2-matched-frequency-format-val/<class index>/<hash>.jpeg
    real.json                         one label list per val image (ReaL): some with two labels, some empty

A class is a concept a CNN picks up in a few epochs at ~32-64 px: a surface texture (solid, horizontal stripes,
vertical stripes, checker) in a colour family, on an object of random outline, position, scale and rotation over a
noisy, cluttered background. Augmentation
helps because the nuisances (position, scale, clutter, lighting) vary more than 100 images per class can cover.
ImageNetV2 comes from a deliberately shifted, harder distribution (smaller objects, more clutter, wider hue spread,
lower contrast), as the real V2 is harder than val. Like ImageNet, one train "JPEG" is a PNG and one is CMYK.
"""

from __future__ import annotations

import colorsys
import gzip
import hashlib
import io
import json
import math
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from rsb.data.index import ARCHIVES, DEVKIT, V2_TOP
from rsb.data.spec import WNIDS, MiniSpec

# A class is a colour family x a surface texture; the outline (disc, square, triangle, cross) is a nuisance. Texture
# and colour survive RandomResizedCrop down to ~32 px, which is what lets a CNN learn them in a few epochs.
TEXTURES = ("solid", "hstripes", "vstripes", "checker")
SHAPES = ("disc", "square", "triangle", "cross")
# Colour families as hue centres (fractions of the colour wheel): 5 far apart, then 5 in between (classes 21-40).
HUES = (0.0, 0.2, 0.4, 0.6, 0.8, 0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class Style:
    """How hard a split's images are: the shift between val and V2 lives here."""

    scale: tuple[float, float] = (0.45, 0.75)
    clutter: tuple[int, int] = (2, 6)
    hue_jitter: float = 0.04
    contrast: float = 1.0
    blur: float = 0.0


TRAIN_STYLE = Style()
V2_STYLE = Style(scale=(0.3, 0.5), clutter=(5, 10), hue_jitter=0.06, contrast=0.7, blur=0.8)
TINY_STYLE = Style(scale=(0.08, 0.12), clutter=(8, 12))  # val images ReaL leaves unscored


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(255 * r), int(255 * g), int(255 * b)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [
            (math.cos(angle + k * math.pi / 2 + math.pi / 4), math.sin(angle + k * math.pi / 2 + math.pi / 4))
            for k in range(4)
        ]
    elif shape == "triangle":
        pts = [(math.cos(angle + k * 2 * math.pi / 3), math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
    else:  # cross: 12-gon of two bars
        w = 0.35
        base = [
            (w, 1),
            (w, w),
            (1, w),
            (1, -w),
            (w, -w),
            (w, -1),
            (-w, -1),
            (-w, -w),
            (-1, -w),
            (-1, w),
            (-w, w),
            (-w, 1),
        ]
        ca, sa = math.cos(angle), math.sin(angle)
        pts = [(x * ca - y * sa, x * sa + y * ca) for x, y in base]
    return [(cx + r * x, cy + r * y) for x, y in pts]


def object_mask(rng: np.random.Generator, size: tuple[int, int], r: float, shape: str | None = None) -> np.ndarray:
    """A filled outline of radius `r` at a random position; its shape drawn from SHAPES unless given."""
    w, h = size
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    mask = Image.new("L", size, 0)
    drawn = SHAPES[rng.integers(len(SHAPES))]
    draw, shape = ImageDraw.Draw(mask), shape or drawn
    if shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=255)
    return np.asarray(mask) > 127


def draw_object(
    img: np.ndarray, rng: np.random.Generator, label: int, style: Style, scale: tuple[float, float] | None = None
) -> None:
    """Paint an object of class `label` into `img` (H, W, 3 float): its colour family and texture are the class."""
    paint(img, rng, TEXTURES[label % len(TEXTURES)], HUES[label // len(TEXTURES)], style, scale)


def paint(
    img: np.ndarray,
    rng: np.random.Generator,
    texture: str,
    hue: float,
    style: Style,
    scale: tuple[float, float] | None = None,
    shape: str | None = None,
) -> None:
    """An object of one colour family and surface texture (the mini's four or the downstream sets' others)."""
    h, w, _ = img.shape
    mask = object_mask(rng, (w, h), 0.5 * min(w, h) * rng.uniform(*(scale or style.scale)), shape)
    v = rng.uniform(0.6, 1.0)
    light = np.array(_rgb(hue + rng.normal(0, style.hue_jitter), rng.uniform(0.65, 1.0), v), dtype=np.float32)
    dark = light * (1 - 0.6 * style.contrast)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.normal(0, 0.15)  # stripes stay near-horizontal / near-vertical: hflip and RandAugment keep the class
    u, t = xx * math.cos(angle) - yy * math.sin(angle), xx * math.sin(angle) + yy * math.cos(angle)
    period = rng.uniform(0.2, 0.28) * max(w, h)  # >= ~8 px per period at 40 px: visible at the mini resolution
    phase = rng.uniform(0, period)
    half = period / 2
    on = {
        "solid": lambda: np.zeros_like(u, dtype=bool),
        "hstripes": lambda: ((t + phase) // half) % 2 == 1,
        "vstripes": lambda: ((u + phase) // half) % 2 == 1,
        "checker": lambda: (((u + phase) // half) + ((t + phase) // half)) % 2 == 1,
        # the downstream sets' textures (rsb.data.downstream): new concepts from the same edges and colours
        "diagonal": lambda: ((u + t + phase) // half) % 2 == 1,
        "dots": lambda: (((u + phase) % half - half / 2) ** 2 + ((t + phase) % half - half / 2) ** 2) < (half / 3) ** 2,
        "rings": lambda: (np.hypot(u - u[mask].mean(), t - t[mask].mean()) // (half / 1.5)) % 2 == 1,
        "fine": lambda: ((t + phase) // (half / 2)) % 2 == 1,
    }[texture]()
    img[mask] = np.where(on[..., None], dark, light)[mask]


def render(rng: np.random.Generator, labels: list[int], style: Style, image_size: int) -> Image.Image:
    """An image of `labels[0]`, plus smaller objects of any further labels (ReaL's multi-label images)."""
    img = background(rng, style, image_size)
    for extra in labels[1:]:
        draw_object(img, rng, extra, style, scale=(0.2, 0.3))
    draw_object(img, rng, labels[0], style)
    return finish(img, style)


def background(rng: np.random.Generator, style: Style, image_size: int) -> np.ndarray:
    """A photo-like canvas (H, W, 3 float): the longer side `image_size`, the shorter drawn from [0.8, 1.0] of it."""
    short = int(image_size * rng.uniform(0.8, 1.0))
    size = (image_size, short) if rng.random() < 0.5 else (short, image_size)
    # Background: a low-saturation colour with smooth noise (lighting) and grain; clutter strokes of any colour.
    base = np.array(_rgb(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.2, 0.8)), dtype=np.float32)
    low = rng.normal(0, 25, size=(4, 4, 1)).astype(np.float32)
    light = np.asarray(Image.fromarray(low[..., 0]).resize(size, Image.Resampling.BICUBIC))[..., None]
    grain = rng.normal(0, 10, size=(size[1], size[0], 1)).astype(np.float32)
    bg = Image.fromarray(np.clip(base + light + grain, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(bg)
    for _ in range(rng.integers(*style.clutter, endpoint=True)):
        x0, y0 = rng.uniform(0, size[0]), rng.uniform(0, size[1])
        x1, y1 = x0 + rng.normal(0, size[0] / 5), y0 + rng.normal(0, size[1] / 5)
        draw.line([x0, y0, x1, y1], fill=_rgb(rng.random(), rng.random(), rng.random()), width=int(rng.integers(1, 3)))
    return np.asarray(bg, dtype=np.float32).copy()


def finish(img: np.ndarray, style: Style) -> Image.Image:
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return out.filter(ImageFilter.GaussianBlur(style.blur)) if style.blur else out


def jpeg_bytes(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1262304000, 0o644  # fixed mtime: byte-identical archives per seed
    tar.addfile(info, io.BytesIO(data))


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            _add(tar, name, data)
    return buf.getvalue()


def _write_targz(path: Path, members: list[tuple[str, bytes]]) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(_tar_bytes(members))


def synsets(spec: MiniSpec, rng: np.random.Generator) -> tuple[list[dict], list[str]]:
    """The devkit's synsets: leaves with ILSVRC2012_IDs 1..K in an order that is NOT sorted-wnid order (as in the real
    devkit, whose ID 1 is n02119789 'kit fox'), followed by inner WordNet nodes (num_children > 0)."""
    wnids = [w for w, _ in WNIDS[: spec.classes]]
    words = dict(WNIDS)
    order = [wnids[i] for i in rng.permutation(spec.classes)]
    leaves = [
        dict(
            ILSVRC2012_ID=i + 1,
            WNID=w,
            words=words[w],
            gloss=f"mini concept {w}",
            num_children=0,
            children=np.zeros(0, dtype=np.uint16),
            wordnet_height=0,
            num_train_images=spec.train_per_class,
        )
        for i, w in enumerate(order)
    ]
    k = spec.classes
    inner = [
        dict(
            ILSVRC2012_ID=k + 1,
            WNID="n01471682",
            words="vertebrate, craniate",
            gloss="animals with backbones",
            num_children=k,
            children=np.arange(1, k + 1, dtype=np.uint16),
            wordnet_height=1,
            num_train_images=k * spec.train_per_class,
        ),
        dict(
            ILSVRC2012_ID=k + 2,
            WNID="n00015388",
            words="animal, animate being, beast, brute, creature, fauna",
            gloss="a living organism",
            num_children=1,
            children=np.array([k + 1], dtype=np.uint16),
            wordnet_height=2,
            num_train_images=k * spec.train_per_class,
        ),
    ]
    return leaves + inner, order


def meta_mat_bytes(records: list[dict]) -> bytes:
    import scipy.io as sio

    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    arr = np.zeros((len(records), 1), dtype=[(f, object) for f in fields])
    for i, rec in enumerate(records):
        for f in fields:
            arr[i, 0][f] = rec[f]
    buf = io.BytesIO()
    sio.savemat(buf, {"synsets": arr})
    # The 116-byte text header carries a creation time; a fixed one keeps the release byte-identical per seed.
    return b"MATLAB 5.0 MAT-file, Platform: posix, Created by: rsb mini release".ljust(116) + buf.getvalue()[116:]


def write_release(out: Path, spec: MiniSpec | None = None) -> dict:
    """Write the five release files into `out` (`spec`: the default MiniSpec); returns a summary (counts, bytes)."""
    spec = spec or MiniSpec()
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    records, id_order = synsets(spec, rng)
    sorted_wnids = sorted(id_order)
    index = {w: i for i, w in enumerate(sorted_wnids)}  # class index = position in sorted wnid order

    train = {
        w: [
            (f"{w}_{n}.JPEG", jpeg_bytes(render(rng, [index[w]], TRAIN_STYLE, spec.image_size)))
            for n in range(spec.train_per_class)
        ]
        for w in sorted_wnids
    }
    # ImageNet's quirks: n02105855_2933.JPEG is really a PNG; 22 train images are CMYK JPEGs.
    w0, w1 = sorted_wnids[0], sorted_wnids[1]
    train[w0].append((f"{w0}_png.JPEG", jpeg_bytes(render(rng, [0], TRAIN_STYLE, spec.image_size), "PNG")))
    train[w1].append((f"{w1}_cmyk.JPEG", jpeg_bytes(render(rng, [1], TRAIN_STYLE, spec.image_size).convert("CMYK"))))
    inner = [(f"{w}.tar", _tar_bytes(files)) for w, files in train.items()]
    (out / ARCHIVES["train"]).write_bytes(_tar_bytes(inner))

    # Val: shuffled classes, flat files; ground truth in devkit IDs; ReaL lists in sorted-index terms.
    labels = rng.permutation(np.repeat(np.arange(spec.classes), spec.val_per_class))
    id_of = {w: i + 1 for i, w in enumerate(id_order)}
    val_files, ground_truth, real = [], [], []
    for i, y in enumerate(labels.tolist()):
        u = rng.random()
        if u < 0.04:  # a wrong original label: ReaL fixes it
            shown = int((y + 1 + rng.integers(spec.classes - 1)) % spec.classes)
            img, lists = render(rng, [shown], TRAIN_STYLE, spec.image_size), [shown]
        elif u < 0.18:  # two objects: ReaL lists both
            other = int((y + 1 + rng.integers(spec.classes - 1)) % spec.classes)
            img, lists = render(rng, [y, other], TRAIN_STYLE, spec.image_size), sorted([y, other])
        elif u < 0.24:  # an object too small to tell: ReaL leaves it unscored
            img, lists = render(rng, [y], TINY_STYLE, spec.image_size), []
        else:
            img, lists = render(rng, [y], TRAIN_STYLE, spec.image_size), [y]
        val_files.append((f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg_bytes(img)))
        ground_truth.append(id_of[sorted_wnids[y]])
        real.append(lists)
    (out / ARCHIVES["val"]).write_bytes(_tar_bytes(val_files))
    (out / ARCHIVES["real"]).write_text(json.dumps(real))

    devkit = [
        (f"{DEVKIT}/data/meta.mat", meta_mat_bytes(records)),
        (f"{DEVKIT}/data/ILSVRC2012_validation_ground_truth.txt", "".join(f"{g}\n" for g in ground_truth).encode()),
        (f"{DEVKIT}/COPYING", b"Generated miniature devkit (rsb), structured as ILSVRC2012_devkit_t12.\n"),
    ]
    _write_targz(out / ARCHIVES["devkit"], devkit)

    v2 = []
    for y in range(spec.classes):
        for _ in range(spec.v2_per_class):
            data = jpeg_bytes(render(rng, [y], V2_STYLE, spec.image_size))
            v2.append((f"{V2_TOP}/{y}/{hashlib.sha1(data).hexdigest()}.jpeg", data))
    _write_targz(out / ARCHIVES["v2"], v2)

    return {
        "spec": asdict(spec),
        "bytes": {k: (out / v).stat().st_size for k, v in ARCHIVES.items()},
        "images": {"train": spec.classes * spec.train_per_class + 2, "val": len(val_files), "v2": len(v2)},
        "val_labels": labels.tolist(),
    }  # the truth the tests hold the devkit mapping against
