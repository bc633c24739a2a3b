"""Reading params.yaml: YAML -> typed frozen dataclasses, every key in its declared domain (rsb.domains), the first
problem one ConfigError line naming the file and the dotted key. The whole file is rsb.config's (`load_params`); a
stage that needs one section reads only it (`load_section`: prepare and mini read `data`, and so import nothing of
the training's configuration).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rsb import domains as D
from rsb.errors import RsbError

T = TypeVar("T")


class ConfigError(RsbError, ValueError):
    """A params.yaml problem, phrased as the key, what it holds, and what to do."""


def check_domains(obj, where: str = "", timm: bool = False) -> None:
    """Every declared key of `obj` (recursively) in its domain; with `timm`, only the domains timm decides."""
    for name, f in D.fields(obj):
        d, value, key = f.metadata["domain"], getattr(obj, name), f"{where}{name}"
        if d.timm == timm and not d.ok(value, obj):
            shown = list(value) if isinstance(value, tuple) else value
            raise ConfigError(f"{key} = {shown!r}: must be {d.text} ({f.metadata['source']})")
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_domains(value, f"{where}{f.name}.", timm)
        elif isinstance(value, dict):
            for k, v in value.items():
                if dataclasses.is_dataclass(v):
                    check_domains(v, f"{where}{f.name}.{k}.", timm)


def _key(where: str, k) -> str:
    return f"{where}.{k}" if where else str(k)


def convert(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, naming the dotted key on a mismatch."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # `float | None`: YAML null is None; `int | str`: either
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(inner) < len(typing.get_args(tp)):
            return None
        for a in inner:
            try:
                return convert(a, value, where)
            except ConfigError:
                if len(inner) == 1:
                    raise
        if isinstance(value, (bool, int, float, str)):
            return value  # of none of the types: the key's domain says what it takes ("auto or true or false")
        raise ConfigError(f"{where} = {value!r}: must be {' or '.join(a.__name__ for a in inner)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r}: must be a mapping")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(f"unknown key {_key(where, unknown[0])} (known: {', '.join(sorted(names))})")
        missing = [
            f.name
            for f in dataclasses.fields(tp)
            if f.name not in value and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(f"missing key {_key(where, missing[0])}")
        make: Any = tp
        return make(**{k: convert(hints[k], v, _key(where, k)) for k, v in value.items()})
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r}: must be a mapping")
        _, vt = typing.get_args(tp)
        return {str(k): convert(vt, v, _key(where, k)) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where} = {value!r}: must be a list")
        return tuple(convert(typing.get_args(tp)[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{where} = {value!r}: must be {'a' if tp is not int else 'an'} {tp.__name__}")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run from the project root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return raw or {}


def load_section(path: str | Path, key: str, cls: type[T]) -> T:
    """One section of params.yaml (`key`, a dataclass `cls`): its types and every key's domain, nothing else."""
    raw = read_yaml(path)
    try:
        if not isinstance(raw, dict) or key not in raw:
            raise ConfigError(f"missing key {key}")
        section = convert(cls, raw[key], key)
        check_domains(section, f"{key}.")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return section
