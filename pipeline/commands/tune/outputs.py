"""What a study leaves in its folder: trials.csv, best.toml, study.json and three pictures.

    trials.csv   one row per trial: number, state, validation H (value), whether it is the recipe's
                 own values (the first trial of a study), the parameters, the
                 validation ZSL/U/S/AUSUC/gamma and selected step, CPU and wall seconds, the error
    best.toml    the recipe after --set with the best complete trial's values: a complete recipe,
                 `msdn train --recipe <out>/best.toml` trains it
    study.json   counts by state, total CPU seconds, the best trial
    history.png, importances.png, slice.png   optuna.visualization.matplotlib (Agg backend)
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from pipeline.config import TrainConfig, apply_overrides
from pipeline.runlog import write_json_atomic

COLUMNS = ("val_ZSL", "val_U", "val_S", "val_AUSUC", "val_gamma", "iteration", "cpu_seconds", "wall_seconds", "error")


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def best_config(study: optuna.Study, base: TrainConfig) -> TrainConfig | None:
    trial = best_trial(study)
    if trial is None:
        return None
    return apply_overrides(base, dict(trial.params), where=f"trial {trial.number}")


def write_outputs(study: optuna.Study, base: TrainConfig, out_dir: Path) -> dict:
    """Write every output; return study.json's content."""
    trials = study.get_trials(deepcopy=False)
    write_trials_csv(trials, out_dir / "trials.csv")
    best = best_trial(study)
    summary = {
        "study": study.study_name, "trials": len(trials),
        "states": {s.name.lower(): sum(t.state == s for t in trials)
                   for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)},
        "interrupted": sum(bool(t.user_attrs.get("interrupted")) for t in trials),
        "cpu_seconds": sum(t.user_attrs.get("cpu_seconds", 0.0) for t in trials),
        "best": None if best is None else {"number": best.number, "validation_H": best.value, "params": best.params,
                                           **{k: best.user_attrs.get(k) for k in COLUMNS[:-1]}},
        "pictures": write_pictures(study, out_dir),
    }
    if best is not None:
        config = best_config(study, base)
        config = TrainConfig.from_dict({**config.to_dict(), "recipe": f"{base.recipe}-tuned"})
        write_recipe(config, out_dir / "best.toml", comment=f"msdn tune: study {study.study_name!r}, trial "
                     f"{best.number} of {len(trials)}, validation H {100 * best.value:.2f}")
        summary["best_toml"] = str(out_dir / "best.toml")
    write_json_atomic(out_dir / "study.json", summary)
    return summary


def write_trials_csv(trials, path: Path) -> None:
    import pandas as pd

    rows = []
    for t in trials:
        row = {"number": t.number, "state": t.state.name.lower(), "validation_H": t.value,
               "is_recipe": bool(t.user_attrs.get("recipe")),
               **{f"param_{k}": v for k, v in t.params.items()},
               **{k: t.user_attrs.get(k) for k in COLUMNS}}
        if t.state == TrialState.PRUNED:
            row["pruned_at_step"] = t.last_step
        rows.append(row)
    pd.DataFrame(rows).to_csv(path, index=False)


def write_recipe(config: TrainConfig, path: Path, comment: str = "") -> None:
    """A TrainConfig as a recipe TOML file (top-level keys, then [head])."""
    data = config.to_dict()
    head = data.pop("head")
    lines = [f"# {comment}"] if comment else []
    lines += [f"{k} = {_toml_value(v)}" for k, v in data.items()]
    lines += ["", "[head]"] + [f"{k} = {_toml_value(v)}" for k, v in head.items()]
    path.write_text("\n".join(lines) + "\n")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else f"{'-' if value < 0 else ''}inf")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_pictures(study: optuna.Study, out_dir: Path) -> dict[str, str]:
    """history.png, importances.png, slice.png where the study has what each needs (importances:
    two complete trials and two parameters that vary); {name: path or why not}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    done = {}
    for name, plot in (("history", plots.plot_optimization_history), ("importances", plots.plot_param_importances),
                       ("slice", plots.plot_slice)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
                axes = plot(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.set_size_inches(max(figure.get_size_inches()[0], 8), max(figure.get_size_inches()[1], 5))
            figure.savefig(out_dir / f"{name}.png", dpi=90, bbox_inches="tight")
            plt.close(figure)
            done[name] = str(out_dir / f"{name}.png")
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            done[name] = f"not drawn: {err}"
    return done
