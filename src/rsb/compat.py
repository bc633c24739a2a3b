"""Where this project's library versions disagree with the ones timm's recipes were written against."""

from __future__ import annotations


def posterize_with_zero_bits() -> None:
    """RandAugment's 'inc1' posterize keeps 4 - int(level / 10 * 4) bits, so 0 bits at magnitude 10, which
    RandAugment reaches whenever a noisy magnitude (mstd) clips at its maximum: about 2% of the draws of DeiT's
    rand-m9-mstd0.5, once in ~10^9 of A1's m7. The Pillow that timm and DeiT were written against returned a black
    image for 0 bits; Pillow 13 (this project's) raises "bits must be between or equal to 1 and 8", which stops a
    run. Where Pillow refuses, timm's posterize gets Pillow's former answer back (every bit cleared); nothing else
    changes. Idempotent; called before any transform exists (timm binds its ops when a transform is built)."""
    from PIL import Image, ImageOps
    from timm.data import auto_augment

    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
        return  # this Pillow still answers 0 bits itself
    except ValueError:
        pass
    original = auto_augment.posterize
    if getattr(original, "rsb_zero_bits", False):
        return

    def posterize(img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:
            return img.point([0] * 256 * len(img.getbands()))
        return original(img, bits_to_keep, **kwargs)

    posterize.rsb_zero_bits = True  # type: ignore[attr-defined]  # the mark that it is installed
    auto_augment.posterize = posterize
    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is original:
            auto_augment.NAME_TO_OP[name] = posterize
