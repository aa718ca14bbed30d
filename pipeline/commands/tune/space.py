"""Search spaces of `msdn tune`: a small TOML file, one table per `--set` key.

    [lr]                      # a float range (log = true: sampled on a log scale)
    low = 3e-5
    high = 3e-4
    log = true

    [iterations]              # ints when low and high are both integers (step optional)
    low = 800
    high = 1600
    step = 100

    [lambda_causal]           # a categorical: any values the key accepts, 0 included
    choices = [0.0, 0.1, 0.3]

    [fusion]                  # list values (fusion's two weights) are offered as "w1,w2" strings
    choices = [[0.9, 0.1], [0.7, 0.3]]

Every key and every bound is checked against the recipe when the space is loaded, so a typo fails
before the first trial, in one line naming the file and the key. Shipped spaces live in
pipeline/recipes/spaces/ and are found by name (`--space CUB100`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError, TrainConfig, apply_overrides, tomllib

SPACE_DIR = Path(__file__).resolve().parents[2] / "recipes" / "spaces"
ALLOWED = {"low", "high", "log", "step", "choices"}


class SpaceError(ConfigError):
    """A search-space file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Param:
    key: str                      # a --set key (lr, lambda_causal, head.fusion, ...)
    kind: str                     # "float", "int" or "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial):
        """The trial's value, as apply_overrides takes it."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.key, list(self.choices))

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.key} in {list(self.choices)}"
        return f"{self.key} in [{self.low}, {self.high}]{' (log)' if self.log else ''}"


def recipe_values(params: list[Param], config: TrainConfig) -> dict:
    """The recipe's own value of each parameter, as the trial would suggest it, where the space
    holds it (a study's first trial is the recipe itself: its validation H is the mark to beat)."""
    flat = {**{k: v for k, v in config.to_dict().items() if k != "head"}, **config.head.to_dict()}
    values = {}
    for p in params:
        value = flat.get(p.key.removeprefix("head."))
        if isinstance(value, list):
            value = ",".join(map(str, value))
        if p.kind == "categorical" and value in p.choices:
            values[p.key] = value
        elif p.kind != "categorical" and isinstance(value, (int, float)) and p.low <= value <= p.high:
            values[p.key] = value
    return values


def space_path(name_or_path: str | Path) -> Path:
    """A shipped space by name (case-insensitive) or a path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        by_name = {p.stem.lower(): p for p in SPACE_DIR.glob("*.toml")}
        if str(name_or_path).lower() not in by_name:
            names = ", ".join(sorted(p.stem for p in SPACE_DIR.glob("*.toml")))
            raise SpaceError(f"--space: unknown space {str(name_or_path)!r}; shipped: {names} (or a .toml path)")
        path = by_name[str(name_or_path).lower()]
    if not path.is_file():
        raise SpaceError(f"{path}: search-space file not found")
    return path


def load_space(name_or_path: str | Path, config: TrainConfig) -> list[Param]:
    """The file's parameters, each checked against `config` (its key exists, its bounds are values
    the key accepts)."""
    path = space_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise SpaceError(f"{path}: not valid TOML: {err}") from None
    if not data:
        raise SpaceError(f"{path}: the space names no parameter")
    params = [_param(path, key, table) for key, table in data.items()]
    for param in params:
        for value in ([param.low, param.high] if param.kind != "categorical" else param.choices):
            apply_overrides(config, {param.key: value}, where=f"{path}: [{param.key}]")
    return params


def _param(path: Path, key: str, table) -> Param:
    where = f"{path}: [{key}]"
    if not isinstance(table, dict):
        raise SpaceError(f"{where} must be a table (low/high[/log/step] or choices)")
    unknown = sorted(set(table) - ALLOWED)
    if unknown:
        raise SpaceError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(ALLOWED)}")
    if "choices" in table:
        choices = table["choices"]
        if set(table) != {"choices"} or not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: choices must be a non-empty list, and alone in its table")
        # optuna stores categorical values as None/bool/int/float/str: a list becomes "a,b"
        return Param(key, "categorical", choices=tuple(",".join(map(str, c)) if isinstance(c, list) else c
                                                       for c in choices))
    low, high = table.get("low"), table.get("high")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    if not numbers or not low < high:
        raise SpaceError(f"{where}: needs numbers low < high (or a choices list), got low={low!r}, high={high!r}")
    log, step = bool(table.get("log", False)), table.get("step")
    if log and low <= 0:
        raise SpaceError(f"{where}: a log range needs low > 0, got {low!r}")
    if log and step is not None:
        raise SpaceError(f"{where}: log and step cannot be combined")
    kind = "int" if isinstance(low, int) and isinstance(high, int) and isinstance(step, (int, type(None))) else "float"
    return Param(key, kind, low=low, high=high, log=log, step=step)
