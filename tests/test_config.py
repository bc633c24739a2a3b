"""params.yaml: every key checked against its declared domain when loaded, one line per error (file, dotted key,
value, domain); every value inside a domain accepted, in the paper's profile and the mini default's."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import yaml
from conftest import ROOT

from rsb import domains as D
from rsb.config import ConfigError, Params, check_timm, domains_markdown, load_params, parse_params

MINI = yaml.safe_load((ROOT / "params.yaml").read_text())
PAPER = copy.deepcopy(MINI)  # the README's paper command, as `dvc exp run -S` would set it
PAPER["data"].update(source="imagenet", raw="/datasets/imagenet")
PAPER["scale"].update(epochs=1, min_epochs=1, img_size=224, batch_size=2048, lr_rule="sqrt", lr_factor=1.0)
PAPER["train"].update(devices=8, micro_batch=256, workers=10)
PROFILES = {"mini": MINI, "paper": PAPER}
# keys whose domain is bounded by another key: to test a key's edges, its dependents move out of the way
MAKE_ROOM = {
    "epochs": {"warmup_epochs": 0.0},
    "lr": {"warmup_lr": 0.0, "min_lr": 0.0},
    "zero_stage": {"channels_last": False},
}  # ZeRO needs contiguous gradients (rsb.config)


def declared(obj, where: str = ""):
    """(dotted key, the object holding it, its domain) for every declared key of a loaded Params, recursively."""
    for name, f in D.fields(obj):
        yield f"{where}{name}", obj, f.metadata["domain"]
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from declared(value, f"{where}{f.name}.")
        elif isinstance(value, dict):
            for k, v in value.items():
                if dataclasses.is_dataclass(v):
                    yield from declared(v, f"{where}{f.name}.{k}.")


def with_value(raw: dict, key: str, value) -> dict:
    raw = copy.deepcopy(raw)
    *parents, last = key.split(".")
    d = raw
    for k in parents:
        d = d[k]
    for dependent, v in MAKE_ROOM.get(last, {}).items():
        if dependent in d:
            d[dependent] = v
    d[last] = list(value) if isinstance(value, tuple) else value
    return raw


def cases(which: str):
    out = []
    for profile, raw in PROFILES.items():
        for key, holder, domain in declared(parse_params(raw)):
            values = domain.inside(holder) if which == "inside" else domain.outside(holder)
            out += [pytest.param(profile, key, v, domain.timm, id=f"{profile}-{key}={v!r}") for v in values]
    return out


def load(raw: dict) -> Params:
    params = parse_params(raw, "p.yaml")
    check_timm(params, "p.yaml")
    return params


def test_both_profiles_load_unchanged():
    assert load_params(ROOT / "params.yaml") == parse_params(MINI)
    load(MINI)
    load(PAPER)


@pytest.mark.parametrize("profile, key, value, needs_timm", cases("outside"))
def test_a_value_outside_its_domain_is_one_line_naming_the_key(profile, key, value, needs_timm):
    with pytest.raises(ConfigError) as e:
        load(with_value(PROFILES[profile], key, value))
    message = str(e.value)
    assert "\n" not in message and message.startswith("p.yaml: ") and message.count("p.yaml") == 1
    assert key in message or key.rsplit(".", 1)[0] in message, message


@pytest.mark.parametrize("profile, key, value, needs_timm", cases("inside"))
def test_every_value_inside_its_domain_is_accepted(profile, key, value, needs_timm):
    load(with_value(PROFILES[profile], key, value))


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "recipes.a1.bce_target_thresh",
            1.5,
            "p.yaml: recipes.a1.bce_target_thresh = 1.5: must be null (no threshold) or a finite number in (0, 1) "
            "(timm BinaryCrossEntropy",
        ),
        ("recipes.a1.lr", float("nan"), "p.yaml: recipes.a1.lr = nan: must be a finite number > 0"),
        (
            "models",
            ["resnet18", "resnet18"],
            "p.yaml: models = ['resnet18', 'resnet18']: must be a non-empty list of distinct items",
        ),
        ("recipes.a1.epochs", 600.5, "p.yaml: recipes.a1.epochs = 600.5: must be an int"),
        ("recipes.a1.min_lr", 0.01, "p.yaml: recipes.a1.min_lr = 0.01: must be a finite number in [0, lr]"),
        (
            "recipes.a1.warmup_epochs",
            600,
            "p.yaml: recipes.a1.warmup_epochs = 600.0: must be a finite number in [0, epochs)",
        ),
        (
            "recipes.a1.aa",
            "rand-m7-mstd0.5-inc1x",
            "p.yaml: recipes.a1.aa = 'rand-m7-mstd0.5-inc1x': must be null "
            "(none: train.py's colour jitter 0.4 instead) or a timm auto-augment "
            "string",
        ),
        ("models", ["resnet5"], "p.yaml: models: 'resnet5' is not a timm architecture"),
        ("experiment", "", "p.yaml: experiment = '': must be a non-empty string"),
        ("train.zero_stage", 3, "p.yaml: train.zero_stage = 3: must be one of 0, 1, 2 (DeepSpeed ZeRO 1/2 partitions"),
        ("recipes.a1.opt", "adamww", "p.yaml: recipes.a1.opt = 'adamww': must be a timm optimizer"),
        ("recipes.t2.sched", "step", "p.yaml: recipes.t2.sched = 'step': this pipeline runs timm's cosine schedule"),
        (
            "recipes.t2.bce_target_thresh",
            1.0,
            "p.yaml: recipes.t2.bce_target_thresh = 1.0: must be null (no threshold) or a finite number in (0, 1)",
        ),
        # keys that take `auto` or a value: a value of neither type is named with the key's domain
        ("train.prefetcher", "yes", "p.yaml: train.prefetcher = 'yes': must be auto or true or false (timm train.py"),
        ("train.prefetcher", 3, "p.yaml: train.prefetcher = 3: must be auto or true or false"),
        ("train.workers", 2.5, "p.yaml: train.workers = 2.5: must be auto or an integer >= 0 (DataLoader workers"),
        ("train.workers", True, "p.yaml: train.workers = True: must be auto or an integer >= 0"),
        ("train.workers", [2], "p.yaml: train.workers = [2]: must be int or str"),
    ],
)
def test_messages_say_file_key_value_and_domain_once(key, value, message):
    with pytest.raises(ConfigError) as e:
        load(with_value(MINI, key, value))
    assert str(e.value).startswith(message), str(e.value)


def test_recipe_names_must_be_stage_safe():
    raw = copy.deepcopy(MINI)
    raw["recipes"]["a-1"] = raw["recipes"].pop("a1")
    raw["run"] = ["a-1"]
    with pytest.raises(ConfigError, match="run = \\['a-1'\\]: must be a non-empty list of distinct items"):
        load(raw)


def test_every_key_has_a_domain_and_the_readme_lists_them():
    """No key escapes: each leaf of params.yaml is declared; the README's table is the declaration rendered."""
    keys = {k for k, _, _ in declared(parse_params(MINI))}

    def leaves(d, where=""):
        for k, v in d.items():
            top_recipes = k == "recipes" and not where  # (procedures.recipes is a list of names)
            mapping_value = f"{where}{k}" == "transfer.weights"  # a key whose value is a name -> file mapping
            if isinstance(v, dict) and not top_recipes and not mapping_value:
                yield from leaves(v, f"{where}{k}.")
            elif top_recipes:
                yield f"{where}{k}"
                for name, rec in v.items():
                    yield from leaves(rec, f"{where}{k}.{name}.")
            else:
                yield f"{where}{k}"

    assert set(leaves(MINI)) == keys
    readme = (ROOT / "README.md").read_text()
    assert domains_markdown() in readme, "README's params table is stale: python -m rsb.config --readme README.md"


def test_nan_and_infinity_are_refused_everywhere_a_number_is_read():
    for key, _holder, domain in declared(parse_params(MINI)):
        if domain.text.startswith("a finite number"):
            for bad in (math.nan, math.inf):
                with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
                    load(with_value(MINI, key, bad))
