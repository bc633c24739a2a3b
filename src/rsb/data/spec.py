"""params.yaml `data`: where the archives are and which source they are, and `data.mini`, the generated release's
size with the ImageNet classes the generator knows. Apart from the generator (rsb.data.mini), so that the params'
declarations (rsb.config) do not import it, and apart from rsb.config, so that prepare and mini read their section
(rsb.paramfile.load_section) without importing the training's configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from rsb import domains as D

# The first 40 ILSVRC2012 classes in sorted-wnid order (index = position), with the devkit's `words`.
WNIDS = [
    ("n01440764", "tench, Tinca tinca"),
    ("n01443537", "goldfish, Carassius auratus"),
    ("n01484850", "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias"),
    ("n01491361", "tiger shark, Galeocerdo cuvieri"),
    ("n01494475", "hammerhead, hammerhead shark"),
    ("n01496331", "electric ray, crampfish, numbfish, torpedo"),
    ("n01498041", "stingray"),
    ("n01514668", "cock"),
    ("n01514859", "hen"),
    ("n01518878", "ostrich, Struthio camelus"),
    ("n01530575", "brambling, Fringilla montifringilla"),
    ("n01531178", "goldfinch, Carduelis carduelis"),
    ("n01532829", "house finch, linnet, Carpodacus mexicanus"),
    ("n01534433", "junco, snowbird"),
    ("n01537544", "indigo bunting, indigo finch, indigo bird, Passerina cyanea"),
    ("n01558993", "robin, American robin, Turdus migratorius"),
    ("n01560419", "bulbul"),
    ("n01580077", "jay"),
    ("n01582220", "magpie"),
    ("n01592084", "chickadee"),
    ("n01601694", "water ouzel, dipper"),
    ("n01608432", "kite"),
    ("n01614925", "bald eagle, American eagle, Haliaeetus leucocephalus"),
    ("n01616318", "vulture"),
    ("n01622779", "great grey owl, great gray owl, Strix nebulosa"),
    ("n01629819", "European fire salamander, Salamandra salamandra"),
    ("n01630670", "common newt, Triturus vulgaris"),
    ("n01631663", "eft"),
    ("n01632458", "spotted salamander, Ambystoma maculatum"),
    ("n01632777", "axolotl, mud puppy, Ambystoma mexicanum"),
    ("n01641577", "bullfrog, Rana catesbeiana"),
    ("n01644373", "tree frog, tree-frog"),
    ("n01644900", "tailed frog, bell toad, ribbed toad, tailed toad"),
    ("n01664065", "loggerhead, loggerhead turtle, Caretta caretta"),
    ("n01665541", "leatherback turtle, leatherback, leathery turtle, Dermochelys coriacea"),
    ("n01667114", "mud turtle"),
    ("n01667778", "terrapin"),
    ("n01669191", "box turtle, box tortoise"),
    ("n01675722", "banded gecko"),
    ("n01677366", "common iguana, iguana, Iguana iguana"),
]


@dataclass(frozen=True)
class MiniSpec:
    """params.yaml `data.mini`: the generated release's size (domains checked when params load)."""

    seed: int = D.param(0, domain=D.number(0, 2**31 - 1, integer=True), source="the generator's seed")
    classes: int = D.param(
        20,
        domain=D.number(2, len(WNIDS), integer=True),
        source=f"the first N ImageNet wnids the generator knows ({len(WNIDS)})",
    )
    train_per_class: int = D.param(100, domain=D.number(1, integer=True), source="train images per class")
    val_per_class: int = D.param(25, domain=D.number(1, integer=True), source="val images per class")
    v2_per_class: int = D.param(10, domain=D.number(1, integer=True), source="V2 images per class")
    image_size: int = D.param(
        96,
        domain=D.number(32, integer=True),
        source="longer side; the shorter is drawn from [0.8, 1.0] of it, like photos",
    )


@dataclass(frozen=True)
class Data:
    source: str = D.param(
        "mini",
        domain=D.one_of("mini", "imagenet", "folder"),
        source="the generated release, ImageNet's official archives, or an extracted ImageNet folder",
    )
    raw: str = D.param("data/mini", domain=D.text(), source="folder with the official archives and real.json")
    prepared: str = D.param("data/prepared", domain=D.text(), source="prepare's output folder")
    verify_md5: bool = D.param(False, domain=D.flag(), source="check real archives against the published md5 sums")
    mini: MiniSpec = field(default_factory=MiniSpec)
