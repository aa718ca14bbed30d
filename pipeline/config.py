"""Training configuration: one plain dataclass, recipes as TOML files, `--set key=value` overrides.

A recipe (pipeline/recipes/<NAME>.toml) holds top-level training keys and a `[head]` table of
HeadConfig keys. Overrides may name a head key directly (`lambda_causal=0.3`) or with its table
(`head.lambda_causal=0.3`); values are parsed as TOML literals and type-checked against the field.
"""
from __future__ import annotations

import difflib
import math
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli package (a 3.10-only dependency)
    import tomli as tomllib

from cache.errors import UserError
from pipeline import RECIPE_DIR, available_recipes  # noqa: F401 (callers import them from here too)
from extract.devices import check_device  # noqa: F401 (the CLI checks --device with the other options)
from heads.config import HeadConfig

SAMPLERS = ("uniform", "class_balanced")
SELECTIONS = ("val", "fixed")
AMPS = ("auto", "none", "bf16", "fp16")
FEATURE_DTYPES = ("float16", "bfloat16", "float32")


class ConfigError(UserError, ValueError):
    """A bad recipe or override; the message names the file or the key."""


@dataclass
class TrainConfig:
    recipe: str = "custom"
    # RMSprop, as the released code (lr, weight decay, momentum, smoothing alpha, eps)
    lr: float = 1e-4
    weight_decay: float = 1e-4
    momentum: float = 0.9
    alpha: float = 0.99
    eps: float = 1e-8
    # batches: "uniform" = batch_size random images; "class_balanced" = min(batch_size, #seen)
    # distinct seen classes, one random image each (released SUN/AWA2 loaders)
    sampler: str = "uniform"
    batch_size: int = 50
    iterations: int = 4234
    eval_every: int = 141
    log_every: int = 50      # the only host synchronisation in the training loop
    seed: int = 214
    # model selection (see pipeline/train.py): "val" picks gamma (and the iteration count when
    # select_iterations) on validation classes, then retrains on trainval; "fixed" trains
    # `iterations` on trainval and uses `gamma`
    selection: str = "val"
    select_iterations: bool = True
    val_seen_fraction: float = 0.2  # share of each validation-seen class held out to measure S
    # early stopping of the validation run: stop once this many evaluations in a row bring no better
    # validation H (then AUSUC) than the best so far; 0 = off (the paper recipes: their schedule runs out)
    patience: int = 0
    gamma: float = 0.0              # calibrated stacking on top of the heads' fixed +-bias
    # augmentation: the probability that a training sample reads the map of its horizontally flipped
    # image (a cache extracted with `msdn extract --flip`); evaluation never does. 0 = not loaded.
    flip: float = 0.0
    # speed
    amp: str = "auto"               # auto = bf16 on CUDA, none on CPU
    feature_dtype: str = "float16"  # how cached features are held in memory
    eval_batch_size: int = 1024
    head: HeadConfig = field(default_factory=HeadConfig)

    def __post_init__(self) -> None:
        checks = [
            (self.sampler in SAMPLERS, f"sampler must be one of {SAMPLERS}, got {self.sampler!r}"),
            (self.selection in SELECTIONS, f"selection must be one of {SELECTIONS}, got {self.selection!r}"),
            (self.amp in AMPS, f"amp must be one of {AMPS}, got {self.amp!r}"),
            (self.feature_dtype in FEATURE_DTYPES,
             f"feature_dtype must be one of {FEATURE_DTYPES}, got {self.feature_dtype!r}"),
            (min(self.batch_size, self.iterations, self.eval_every, self.log_every, self.eval_batch_size) > 0,
             "batch_size, iterations, eval_every, log_every and eval_batch_size must be positive"),
            (0.0 < self.val_seen_fraction < 1.0, f"val_seen_fraction must lie in (0, 1), got {self.val_seen_fraction}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (0.0 <= self.flip <= 1.0, f"flip must lie in [0, 1] (a probability), got {self.flip}"),
            (self.patience >= 0, f"patience must be >= 0 (0 = no early stopping), got {self.patience}"),
            # RMSprop: alpha >= 1 never forgets the first squared gradients (or, above 1, makes their
            # average negative: NaN steps); momentum >= 1 makes the steps grow without bound
            *finite_checks(self, {"lr": "> 0", "eps": "> 0", "weight_decay": ">= 0", "momentum": "[0, 1)",
                                  "alpha": "[0, 1)", "gamma": "any"}),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"TrainConfig: {message}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["head"] = self.head.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "TrainConfig":
        return apply_overrides(cls(), _flatten(d, where), where=where)


_RANGES = {"any": (lambda v: True, ""), "> 0": (lambda v: v > 0, " > 0"), ">= 0": (lambda v: v >= 0, " >= 0"),
           "[0, 1)": (lambda v: 0 <= v < 1, " in [0, 1)")}


def finite_checks(obj, ranges: dict) -> list[tuple[bool, str]]:
    """(ok, message) per float field of `obj`: finite (no NaN, no inf) and inside its range.
    `ranges` maps a field name to "any", "> 0", ">= 0" or "[0, 1)"."""
    checks = []
    for name, rule in ranges.items():
        value, (test, text) = getattr(obj, name), _RANGES[rule]
        checks.append((math.isfinite(value) and test(value), f"{name} must be a finite number{text}, got {value!r}"))
    return checks


TRAIN_KEYS = {f.name for f in fields(TrainConfig)} - {"head"}
HEAD_KEYS = {f.name for f in fields(HeadConfig)}
assert not TRAIN_KEYS & HEAD_KEYS, "training and head keys must not collide: overrides use bare names"


def load_recipe(name_or_path: str | Path) -> TrainConfig:
    """A recipe by name (case-insensitive, e.g. "CUB") or a path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        by_name = {p.stem.lower(): p for p in RECIPE_DIR.glob("*.toml")}
        if str(name_or_path).lower() not in by_name:
            raise ConfigError(f"unknown recipe {str(name_or_path)!r}; available: {', '.join(available_recipes())} "
                              "(or give a path to a .toml file)")
        path = by_name[str(name_or_path).lower()]
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return TrainConfig.from_dict(data, where=str(path))


def apply_overrides(config: TrainConfig, overrides: dict | list[str] | tuple[str, ...], *,
                    where: str = "--set") -> TrainConfig:
    """A new TrainConfig with `overrides` applied: a dict of typed values or "key=value" strings."""
    if not isinstance(overrides, dict):
        overrides = dict(_split_assignment(item) for item in overrides)
    train, head = {}, {}
    for key, value in overrides.items():
        name = key.removeprefix("head.")
        target = HEAD_KEYS if (key.startswith("head.") or name not in TRAIN_KEYS) else TRAIN_KEYS
        if name not in target:
            raise ConfigError(f"{where}: unknown config key {key!r}{_suggest(key)}")
        owner = HeadConfig if target is HEAD_KEYS else TrainConfig
        coerced = _coerce(value, typing.get_type_hints(owner)[name], f"{where}: {key}")
        (head if target is HEAD_KEYS else train)[name] = coerced
    try:
        new_head = replace(config.head, **head) if head else config.head
        return replace(config, **train, head=new_head)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _flatten(d: dict, where: str) -> dict:
    flat = {k: v for k, v in d.items() if k != "head"}
    head = d.get("head", {})
    if not isinstance(head, dict):
        raise ConfigError(f"{where}: 'head' must be a table of head keys")
    flat.update({f"head.{k}": v for k, v in head.items()})
    return flat


def _split_assignment(item: str) -> tuple[str, object]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {item!r}")
    text = text.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # bare words such as `sampler=uniform` are strings
    return key.strip(), value


def _coerce(value, annotation, where: str):
    """Check (and gently convert) a parsed value against a field annotation."""
    def fail(expected: str):
        raise ConfigError(f"{where}: expected {expected}, got {value!r}")

    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        fail("a boolean (true/false)")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            fail("an integer")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    if typing.get_origin(annotation) is tuple:
        items = value.split(",") if isinstance(value, str) else value
        args = typing.get_args(annotation)
        if not isinstance(items, (list, tuple)) or len(items) != len(args):
            fail(f"{len(args)} comma-separated values")
        try:
            return tuple(float(x) for x in items)
        except (TypeError, ValueError):
            fail(f"{len(args)} numbers")
    raise ConfigError(f"{where}: unsupported field type {annotation}")


def _suggest(key: str) -> str:
    names = sorted(TRAIN_KEYS | HEAD_KEYS)
    close = difflib.get_close_matches(key.removeprefix("head."), names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(names)}"
