"""The study itself: where it is stored, how it samples and prunes, which trials count.

Storage: Optuna's journal file (<out>/study.journal, an append-only log with file locks, so
processes on one machine or on several sharing a filesystem work on one study), or `--storage URL`
(a database Optuna knows, e.g. postgresql://...). Opening an existing study continues it
(load_if_exists); its settings (recipe after --set, cache, space, pruner) are kept in the study
and a rerun with other settings is refused rather than mixed in.

A trial whose process died (kill -9, a node lost) stays "running" in the storage. Each trial
records its host and process id; a rerun marks this host's trials whose process is gone as failed
(user attribute "interrupted"), and those do not count towards --trials.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from pipeline.config import ConfigError, TrainConfig

STUDY_NAME = "msdn-tune"
PRUNERS = ("median", "halving", "none", "threshold:<H>")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class StudyError(ConfigError):
    """A study that cannot be opened or continued as asked."""


def open_storage(out_dir: str | Path, storage: str | None):
    """The journal file in the study folder, or the --storage URL."""
    if storage:
        return storage
    from optuna.storages.journal import JournalFileBackend

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(Path(out_dir) / "study.journal")))


def make_sampler(seed: int, worker: int = 0, resumed_at: int = 0) -> optuna.samplers.TPESampler:
    """TPE with a fixed seed; worker i draws with seed + i (equal seeds would draw equal startup
    trials); constant_liar keeps parallel workers off the points others are running. A worker that
    joins a study already holding `resumed_at` trials draws from a stream of its own (else a rerun
    would repeat the first run's random startup points, trial for trial)."""
    if resumed_at:
        seed = int(np.random.SeedSequence([seed, worker, resumed_at]).generate_state(1)[0])
    else:
        seed += worker
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, constant_liar=True)


def make_pruner(spec: str, *, eval_every: int, iterations: int) -> optuna.pruners.BasePruner:
    """median: a trial whose best validation H so far is below the median of earlier trials at the
    same step (after 4 finished trials, once a quarter of the recipe's steps are done: earlier
    evaluations say little about the end); halving: successive
    halving over the evaluations (reduction factor 3); threshold:<H>: prune below a validation H
    of <H> (0-1), e.g. a floor for useless settings; none."""
    if spec == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=max(eval_every, iterations // 4) - 1)
    if spec == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=eval_every, reduction_factor=3)
    if spec == "none":
        return optuna.pruners.NopPruner()
    if spec.startswith("threshold:"):
        try:
            return optuna.pruners.ThresholdPruner(lower=float(spec.partition(":")[2]))
        except ValueError:
            pass
    raise StudyError(f"--pruner: expected one of {', '.join(PRUNERS)}, got {spec!r}")


def open_study(storage, study_name: str, settings: dict, *, seed: int, pruner: str, worker: int = 0,
               create: bool = False, resumed_at: int = 0) -> optuna.Study:
    """The study (created when `create`, else it must exist); its settings must match. resumed_at:
    the trials it held when this `msdn tune` began (0: a new study), for the sampler's seed."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # msdn tune prints its own line per trial
    config = settings["config"]
    sampler = make_sampler(seed, worker, resumed_at)
    pruner_obj = make_pruner(pruner, eval_every=config["eval_every"], iterations=config["iterations"])
    if create:
        study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize",
                                    sampler=sampler, pruner=pruner_obj, load_if_exists=True)
    else:
        study = optuna.load_study(storage=storage, study_name=study_name, sampler=sampler, pruner=pruner_obj)
    stored = study.user_attrs.get("settings")
    if stored is None:
        study.set_user_attr("settings", settings)
    elif with_new_defaults(stored) != settings:
        stored = with_new_defaults(stored)
        changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        raise StudyError(f"study {study_name!r} was started with other settings ({', '.join(changed)} differ); "
                         "rerun it with the same options, or give another --out / --study-name")
    return study


def with_new_defaults(settings: dict) -> dict:
    """Stored settings with the config keys a newer msdn added since the study began filled in at
    their defaults (a new key's default keeps the old behaviour, e.g. patience = 0), so that an
    upgrade does not refuse to continue a study; a new key set to anything else still differs."""
    try:
        config = TrainConfig.from_dict(settings["config"], where="stored study settings").to_dict()
    except (ConfigError, KeyError, TypeError, ValueError):
        return settings
    return {**settings, "config": config}


def counted(study: optuna.Study) -> int:
    """Trials towards --trials: finished (complete, pruned, failed) or running, minus interrupted ones."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (*FINISHED, TrialState.RUNNING) and not t.user_attrs.get("interrupted"))


def mark_owner(trial: optuna.Trial) -> None:
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())


def fail_interrupted(study: optuna.Study) -> list[int]:
    """Mark this host's running trials whose process is gone as failed (interrupted); their numbers."""
    host, storage, gone = socket.gethostname(), study._storage, []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") == host and not _alive(t.user_attrs.get("pid")):
            try:
                storage.set_trial_user_attr(t._trial_id, "interrupted", True)
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another rerun marked it first
            gone.append(t.number)
    return gone


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
