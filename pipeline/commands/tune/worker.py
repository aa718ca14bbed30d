"""A tune worker: runs trials of one study until it holds --trials of them.

One trial = `msdn train`'s validation run and selection (pipeline/train.py: validation_run) with the trial's `--set` values, and nothing else: the feature store holds
only the validation task's rows (all trainval images), so no test image is read during a study.
The objective is the selected validation H; each validation evaluation the run already makes
reports its best-so-far H to the study, and the pruner may stop the run there. A run that
diverges, or a cache with non-finite rows, is a failed trial (not a zero), its error kept.

`run_worker` takes plain values only: it is a launcher Task's target (pipeline/launch), run in a
spawned process, a Slurm array element, or in the command's own process.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import optuna

from cache.reader import CacheError
from pipeline.commands.tune.space import load_space
from pipeline.commands.tune.study import counted, mark_owner, open_storage, open_study
from pipeline.config import TrainConfig, apply_overrides
from pipeline.engine import DivergedError
from pipeline.train import validation_run


def run_worker(*, out_dir: str, storage: str | None, study_name: str, settings: dict, space: str, cache: str,
               trials: int, seed: int, pruner: str, worker: int = 0, device: str = "auto",
               max_memory: str | None = None, threads: int | None = None, resumed_at: int = 0) -> int:
    """Run trials until the study counts `trials`; returns how many this worker ran. threads:
    torch's CPU threads in this process (None: torch's default, or $OMP_NUM_THREADS)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    base = TrainConfig.from_dict(settings["config"], where="study settings")
    params = load_space(space, base)
    study = open_study(open_storage(out_dir, storage), study_name, settings, seed=seed, pruner=pruner,
                       worker=worker, resumed_at=resumed_at)
    ran = 0
    while counted(study) < trials:
        study.optimize(lambda trial: objective(trial, base, params, cache=cache, out_dir=Path(out_dir),
                                               device=device, max_memory=max_memory),
                       n_trials=1, catch=(DivergedError, CacheError), gc_after_trial=True,
                       callbacks=[lambda _study, trial: print(trial_line(trial), file=sys.stderr, flush=True)])
        ran += 1
    return ran


def objective(trial: optuna.Trial, base: TrainConfig, params, *, cache: str, out_dir: Path, device: str,
              max_memory: str | None) -> float:
    mark_owner(trial)
    values = {p.key: p.suggest(trial) for p in params}
    config = apply_overrides(base, values, where=f"trial {trial.number}")
    start_cpu, start = time.process_time(), time.perf_counter()

    def report(step: int, record: dict) -> None:
        best = max(float(record["best"]["H"]), trial.user_attrs.get("best_H_so_far", 0.0))
        trial.set_user_attr("best_H_so_far", best)
        trial.report(best, step)
        if trial.should_prune():
            trial.set_user_attr("cpu_seconds", time.process_time() - start_cpu)
            raise optuna.TrialPruned(f"validation H {100 * best:.2f} at step {step}")

    try:
        selection = validation_run(config, cache, out_dir / "trials" / f"trial-{trial.number:04d}",
                                   device=device, max_memory=max_memory, on_validation=report)
    except (DivergedError, CacheError) as err:
        trial.set_user_attr("error", str(err))
        trial.set_user_attr("cpu_seconds", time.process_time() - start_cpu)
        raise
    v = selection["validation"]
    for name, value in {"val_ZSL": v["ZSL"], "val_AUSUC": v["AUSUC"], "val_U": v["best"]["U"],
                        "val_S": v["best"]["S"], "val_gamma": selection["gamma"], "iteration": selection["iteration"],
                        "cpu_seconds": time.process_time() - start_cpu,
                        "wall_seconds": time.perf_counter() - start}.items():
        trial.set_user_attr(name, float(value))
    return float(v["best"]["H"])


def trial_line(trial: optuna.trial.FrozenTrial) -> str:
    """One line per finished trial: its state, validation H and values."""
    values = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    cpu = trial.user_attrs.get("cpu_seconds")
    cpu = f", {cpu:.0f} CPU s" if cpu is not None else ""
    if trial.state.name == "COMPLETE":
        what = f"validation H {100 * trial.value:.2f} at step {trial.user_attrs.get('iteration', 0):.0f}"
    elif trial.state.name == "PRUNED":
        what = f"pruned at step {trial.last_step} (best validation H {100 * trial.user_attrs.get('best_H_so_far', 0):.2f})"
    else:
        what = f"failed: {trial.user_attrs.get('error', 'see the log')}"
    return f"trial {trial.number}: {what}; {values}{cpu}"
