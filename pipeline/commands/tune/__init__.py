"""`msdn tune`: choose hyper-parameters on validation with an Optuna study.

    space.py    the search-space TOML (pipeline/recipes/spaces/*.toml)
    study.py    storage (journal file in --out, or --storage URL), sampler, pruner, resume
    worker.py   one trial = `msdn train`'s validation run + selection; the objective is validation H
    outputs.py  trials.csv, best.toml, study.json, pictures
    final.py    --final: best.toml vs the recipe on the test split, paired by seed

run_tune: check everything, open (or continue) the study, run workers until it holds --trials
trials (in this process for one local worker; else as launcher Tasks, pipeline/launch), write the
outputs, then --final. Every worker reads and writes the study's storage only, so a rerun of the
same command continues where the last one stopped.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cache.reader import FeatureCache
from pipeline.commands.tune.space import load_space, recipe_values, space_path
from pipeline.commands.tune.study import STUDY_NAME, counted, fail_interrupted, open_storage, open_study
from pipeline.config import ConfigError, apply_overrides, load_recipe
from pipeline.launch import SlurmOptions, Task, make_launcher

WORKER = "pipeline.commands.tune.worker:run_worker"


@dataclass
class TuneOptions:
    recipe: str
    cache: str
    space: str
    out_dir: Path
    trials: int = 20                     # the study's total (complete + pruned + failed), not this run's
    overrides: tuple[str, ...] = ()      # --set for every trial (and for the recipe in --final)
    study_name: str = STUDY_NAME
    storage: str | None = None           # None: <out>/study.journal
    pruner: str = "median"
    seed: int = 0                        # the sampler's seed
    workers: int = 1
    launcher: str = "local"
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    device: str = "auto"
    max_memory: str | None = None
    final: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)


def run_tune(options: TuneOptions, log: Callable[[str], None] | None = None) -> dict:
    """Run (or continue) the study; write its outputs; --final. Returns study.json's content
    (with "final": the paired table when --final)."""
    from pipeline.commands.tune.outputs import best_config, write_outputs

    log = log or (lambda msg: print(msg, file=sys.stderr))
    out_dir = Path(options.out_dir).resolve()
    base = apply_overrides(load_recipe(options.recipe), list(options.overrides))
    if base.selection != "val":
        raise ConfigError("msdn tune: the objective is validation H, so selection must be 'val' "
                          f"(got selection={base.selection!r})")
    space = str(space_path(options.space).resolve())
    params = load_space(space, base)
    cache = str(Path(options.cache).resolve())
    with FeatureCache(cache) as opened:  # a missing or broken cache fails here, not in every trial
        content_key = opened.content_key
    settings = {"config": base.to_dict(), "space": [p.describe() for p in params], "pruner": options.pruner,
                "content_key": content_key}
    storage = open_storage(out_dir, options.storage)
    study = open_study(storage, options.study_name, settings, seed=options.seed, pruner=options.pruner, create=True)
    resumed_at = len(study.trials)  # fixed before any worker starts: their samplers' seeds depend on it
    if not study.trials:
        study.enqueue_trial(recipe_values(params, base), user_attrs={"recipe": True})
    interrupted = fail_interrupted(study)
    if interrupted:
        log(f"trials {interrupted} were interrupted (their process is gone): marked failed, not counted")
    have = counted(study)
    log(f"study {options.study_name!r} in {options.storage or out_dir / 'study.journal'}: {have} of "
        f"{options.trials} trials; space: {'; '.join(p.describe() for p in params)}")
    if have < options.trials:
        worker_kwargs = dict(out_dir=str(out_dir), storage=options.storage, study_name=options.study_name,
                             settings=settings, space=space, cache=cache, trials=options.trials, seed=options.seed,
                             pruner=options.pruner, device=options.device, max_memory=options.max_memory,
                             resumed_at=resumed_at)
        run_workers(worker_kwargs, options, out_dir, log)
    study = open_study(storage, options.study_name, settings, seed=options.seed, pruner=options.pruner)
    summary = write_outputs(study, base, out_dir)
    if options.final:
        from pipeline.commands.tune.final import run_final

        tuned = best_config(study, base)
        if tuned is None:
            raise ConfigError(f"--final: study {options.study_name!r} has no complete trial to train")
        summary["final"] = run_final(tuned, base, cache, out_dir, list(options.seeds), device=options.device,
                                     max_memory=options.max_memory, log=log,
                                     tuned_from={"trial": summary["best"]["number"],
                                                 "validation_H": summary["best"]["validation_H"],
                                                 "params": summary["best"]["params"]})
        summary["final_markdown"] = (out_dir / "final" / "paired.md").read_text()
    return summary


def run_workers(worker_kwargs: dict, options: TuneOptions, out_dir: Path, log) -> None:
    """One local worker runs here; more, or any Slurm worker, go through the launcher."""
    if options.launcher == "local" and options.workers == 1:
        from pipeline.commands.tune.worker import run_worker

        run_worker(**worker_kwargs)
        return
    if options.launcher == "slurm":
        threads = options.slurm.cpus_per_task
    else:  # the cores shared evenly, unless the user fixed the thread count
        threads = None if os.environ.get("OMP_NUM_THREADS") else max(1, (os.cpu_count() or 1) // options.workers)
    tasks = [Task(name=f"worker-{i}", target=WORKER, kwargs={**worker_kwargs, "worker": i, "threads": threads})
             for i in range(options.workers)]
    if options.launcher == "slurm":
        launcher = make_launcher("slurm", folder=out_dir / "slurm", slurm=options.slurm)
    else:
        launcher = make_launcher("local", workers=options.workers)
    launch = launcher.launch(tasks)
    if launch.job_id:
        log(f"workers: Slurm job {launch.job_id} ({options.workers} array tasks)")
    try:
        states = launch.wait(lambda n: log(f"workers: {n['running']} running, {n['pending']} pending, "
                                           f"{n['done']} done, {n['failed']} failed"))
    except KeyboardInterrupt:
        launch.cancel()
        raise
    failed = sorted(name for name, state in states.items() if state == "failed")
    if failed:
        log(f"workers {failed} stopped with an error (their log: stderr of this command, or {out_dir / 'slurm'})")
