"""The domain of every params.yaml key, declared on the dataclass field it guards (`param(domain=..., source=...)`).

One declaration serves three readers: `rsb.config` checks each value when params.yaml is loaded (one line per error:
file, key, value, domain, what to do); `domain_table()` renders the README's table of keys; and the tests take each
domain's values `inside` (must be accepted) and `outside` (must be refused). Domains that need timm to decide
(architecture names, RandAugment strings, optimizer and scheduler names) are marked `timm=True` and checked by
`rsb.config.check_timm`, which the stages that do expensive work call before it (importing timm costs seconds).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any

Check = Callable[[Any, Any], bool]  # (value, the object that holds it)
Values = Callable[[Any], list]  # the holder -> example values


@dataclass(frozen=True)
class Domain:
    text: str  # how the README and the errors say it: "in (0, 1)", "one of mini, imagenet"
    ok: Check
    inside: Values = lambda holder: []
    outside: Values = lambda holder: []
    timm: bool = False  # decided by timm's own parser (rsb.config.check_timm)


def param(default=MISSING, *, domain: Domain, source: str = "", factory=MISSING):
    """A dataclass field with its domain and where that domain comes from (timm, the paper, MLflow, DVC...)."""
    meta = {"domain": domain, "source": source}
    if factory is not MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def number(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    hi_field: str | None = None,
    integer: bool = False,
) -> Domain:
    """A finite number in an interval; `hi_field` bounds it by another key of the same section (min_lr <= lr)."""

    def top(h):
        return getattr(h, hi_field) if hi_field else hi

    def ok(v, h):
        t = top(h)
        return (
            _real(v)
            and (not integer or isinstance(v, int))
            and (lo is None or (v > lo if lo_open else v >= lo))
            and (t is None or (v < t if hi_open else v <= t))
        )

    upper = hi_field or (None if hi is None else _fmt(hi))
    if lo is not None and upper is not None:
        text = f"in {'(' if lo_open else '['}{_fmt(lo)}, {upper}{')' if hi_open else ']'}"
    elif lo is not None:
        text = f"{'>' if lo_open else '>='} {_fmt(lo)}"
    else:
        text = f"{'<' if hi_open else '<='} {upper}"
    text = ("an integer " if integer else "a finite number ") + text

    def inside(h):
        t, eps = top(h), (1 if integer else 1e-9)
        vals = [lo + eps if lo_open else lo] if lo is not None else []
        if t is not None:
            vals.append(t - eps * (abs(t) if not integer and t else 1) if hi_open else t)
        elif lo is not None:
            vals.append(lo + 1000)
        return [int(v) if integer else float(v) for v in vals]

    def outside(h):
        t = top(h)
        vals = [] if integer else [float("nan"), float("inf")]
        if lo is not None:
            vals.append(lo if lo_open else lo - 1)
        if t is not None:
            vals.append(t if hi_open else (t + 1 if integer else t * 1.5 + 1))
        return [int(v) if integer and math.isfinite(v) else v for v in vals]

    return Domain(text, ok, inside, outside)


def one_of(*choices) -> Domain:
    bad: object
    if all(isinstance(c, bool) for c in choices):
        bad = not choices[0]
    else:
        bad = max(choices) + 1 if all(isinstance(c, int) for c in choices) else f"{choices[0]}x"
    return Domain(
        "one of " + ", ".join(str(c) for c in choices),
        lambda v, h: v in choices,
        lambda h: list(choices),
        lambda h: [bad],
    )


def flag() -> Domain:
    return Domain("true or false", lambda v, h: isinstance(v, bool), lambda h: [True, False], lambda h: [])


def auto_or(d: Domain) -> Domain:
    """`auto` (decided for the machine when the run is resolved) or a value of `d`."""
    return Domain(
        f"auto or {d.text}",
        lambda v, h: v == "auto" or d.ok(v, h),
        lambda h: ["auto", *d.inside(h)],
        lambda h: ["automatic", *d.outside(h)],
    )


NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]*")


def name() -> Domain:
    """Names that become DVC stage names (train@<arch>-<recipe>), file names and MLflow run names: no '-' (it joins
    arch and recipe), no '@', '/', ':' or spaces."""
    return Domain(
        "a name of letters, digits, '_' and '.' (not starting with '.')",
        lambda v, h: isinstance(v, str) and NAME.fullmatch(v) is not None,
        lambda h: ["a1", "resnet50.a1_in1k"],
        lambda h: ["a-1", "a b", "", ".x"],
    )


def text() -> Domain:
    return Domain(
        "a non-empty string without surrounding spaces",
        lambda v, h: isinstance(v, str) and v != "" and v == v.strip(),
        lambda h: ["rsb", "data/prepared"],
        lambda h: ["", " rsb"],
    )


def optional(inner: Domain, why: str) -> Domain:
    """null (YAML `null`: timm's None, the option unset) or a value in `inner`."""
    return Domain(
        f"null ({why}) or {inner.text}",
        lambda v, h: v is None or inner.ok(v, h),
        lambda h: [None, *inner.inside(h)],
        inner.outside,
        timm=inner.timm,
    )


def unique(element: Domain, example: str) -> Domain:
    """A non-empty list of distinct elements, each in `element` (`example`: one that is valid in context)."""

    def ok(v, h):
        return bool(v) and len(set(v)) == len(v) and all(element.ok(x, h) for x in v)

    return Domain(
        f"a non-empty list of distinct items, each {element.text}",
        ok,
        lambda h: [(example,)],
        lambda h: [(), (example, example), *[(x,) for x in element.outside(h)]],
        timm=element.timm,
    )


def timm_name(kind: str, parse: Callable[[str], object], good: str, bad: str) -> Domain:
    """A string that timm's own code accepts (`parse` returns False or raises otherwise)."""

    def ok(v, h):
        try:
            return isinstance(v, str) and bool(parse(v))
        except Exception:  # noqa: BLE001 - whatever timm's parser raises means: not a valid value
            return False

    return Domain(kind, ok, lambda h: [good], lambda h: [bad], timm=True)


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def fields(obj) -> list[tuple[str, dataclasses.Field]]:
    return [(f.name, f) for f in dataclasses.fields(obj) if "domain" in f.metadata]


def domain_table(root: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, domain, source) for every declared key under a dataclass type, in declaration order."""
    import typing

    rows = []
    hints = typing.get_type_hints(root)
    for f in dataclasses.fields(root):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if "domain" in f.metadata:
            d = f.metadata["domain"]
            rows.append((key, d.text + (" (timm decides)" if d.timm else ""), f.metadata["source"]))
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            rows += domain_table(tp, key + ".")
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            rows += domain_table(typing.get_args(tp)[1], key + ".<name>.")
    return rows
