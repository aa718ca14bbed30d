"""`msdn train`: fit the MSDN++ heads on a feature cache and report ZSL / GZSL on its test split.

Model selection never looks at the test set (selection = "val", the default):
  1. validation run: train on trainval images of the xlsa17 train classes (minus a held-out fifth
     of each class's images), validation classes (val_loc) playing unseen; every `eval_every`
     steps compute the exact seen-unseen curve on the held-out images and keep the best-H point;
  2. the step with the best validation H fixes the iteration count (select_iterations = true; else
     the recipe's `iterations`) and its curve fixes gamma;
  3. final run: the same recipe and seed on all of trainval for that many steps; evaluate the
     test split once, at the selected gamma (and, for reference, at gamma = 0: the heads' fixed
     +-1 bias alone, as the released evaluation).
selection = "fixed" skips 1-2 and trains `iterations` steps with `gamma`.
`paper_protocol` adds the released scripts' numbers, clearly labelled: the final run continues to
the recipe's `iterations`, evaluates the test split every `eval_every` steps at gamma = 0, and
reports the best H and the best ZSL accuracy seen (selection on the test set).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np

from cache.reader import CacheError, FeatureCache
from extract.devices import resolve_device
from extract.progress import above_bars
from heads.runtime import keep_freed_memory
from pipeline.checkpoint import cache_identity, save_checkpoint
from pipeline.config import TrainConfig
from pipeline.engine import DivergedError, build_model, deterministic_mode, evaluate_task, fit
from pipeline.features import bank_dtype, flipped_training_rows
from pipeline.memory import describe_plan, memory_plan, open_store
from pipeline.metrics import scores_of
from pipeline.precision import choose_amp
from pipeline.runlog import RunLog, write_json_atomic
from pipeline.tasks import Task, benchmark_task, usable_splits, validation_task
from pipeline.tb_log import TensorBoardLog, summary_writer_class
from pipeline.train_lines import evaluation_line, selection_line, validation_line


def train(config: TrainConfig, cache_path: str | Path, out_dir: str | Path, *, device: str = "auto",
          deterministic: bool = False, paper_protocol: bool = False, progress: bool = True,
          overwrite: bool = False, max_memory: str | None = None, log: Callable[[str], None] | None = None,
          tensorboard: bool = False) -> dict:
    """Train, select, evaluate; write the run folder; return the summary dict (see summary.json).
    max_memory: the process's memory limit ("6G"; default: from the available memory), which
    decides between the resident bank and streaming (pipeline/memory.py). `log` (default: stderr)
    gets that choice, one line naming the validation split and where it came from, one line per
    validation evaluation (step, ZSL, U, S, H) and the selection (step, gamma, validation H)
    before the final run. tensorboard: also write TensorBoard scalars into <out_dir>/tensorboard
    (pipeline/tb_log.py; a ConfigError before any work when the package is missing).
    A run that diverges (DivergedError) or whose cache holds NaN/inf (CacheError) stops with a
    "failed" record in metrics.jsonl and no summary.json, so that neither `msdn report` nor
    `msdn ablate` takes it for a result."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if tensorboard:
        summary_writer_class()  # a missing package is refused before anything is read or written
    # the cache is recorded absolute, so that predict/evaluate/visualize find it from any directory
    # (and by its content key in the store when it moved: pipeline/run_cache.py)
    device, cache_path, out_dir = resolve_device(device), Path(cache_path).absolute(), Path(out_dir)
    amp_choice = choose_amp(config.amp, device)
    amp = amp_choice.amp
    keep_freed_memory(True)  # the step's large temporaries reuse mapped memory (heads/runtime.py)
    with FeatureCache(cache_path) as cache, deterministic_mode(deterministic):
        labels = np.asarray(cache.labels)
        splits, skipped = usable_splits(cache)
        test = benchmark_task(labels, splits, num_classes=int(cache.att.shape[0]))
        val = (validation_split(labels, splits, config, cache_path, hint=" (or train with --set selection=fixed)")
               if config.selection == "val" else None)
        identity = cache_identity(cache)
        flipped = flipped_training_rows(cache, config.flip, test.train_rows)  # trainval: holds validation's too
        plan = feature_plan(cache, test.rows(), device, config, amp, max_memory=max_memory, flipped=flipped)
        run = RunLog(out_dir, overwrite=overwrite)  # after every refusal: --overwrite keeps the old run till then
        store = open_features(cache, test.rows(), device, config, amp, plan, run, flipped)
        log(describe_plan(plan))
        run.write_config({**config.to_dict(), "run": {
            "cache": str(cache_path), "cache_identity": identity, "device": str(device), "amp": amp,
            "amp_choice": amp_choice.to_dict(), "deterministic": deterministic, "paper_protocol": paper_protocol,
            "skipped_rows_dropped": skipped, "features": plan, "attribute_embeddings": attribute_embeddings(cache, config),
            "tasks": [t.describe() for t in (val, test) if t is not None]}})
        log(validation_line(val))
        board = TensorBoardLog(out_dir) if tensorboard else None
        try:
            common = dict(cache=cache, store=store, labels=labels, amp=amp, run=run, progress=progress,
                          log=log, board=board)
            if val is not None:
                selection = select_on_validation(config, val, **common)
            else:
                selection = {"mode": "fixed", "iteration": config.iterations, "gamma": config.gamma}
            log(selection_line(selection, config, paper_protocol=paper_protocol))
            final = train_final(config, test, selection, identity, paper_protocol=paper_protocol, **common)
        except (DivergedError, CacheError) as err:
            run.log({"phase": "failed", "error": str(err)})
            raise
        finally:
            if board is not None:
                board.close()

    summary = {
        "recipe": config.recipe, "cache": str(cache_path), "content_key": identity["content_key"],
        "device": str(device), "amp": amp, "deterministic": deterministic,
        "feature_store": {"mode": plan["mode"], "resident_on_device": store.resident, "bytes": store.nbytes},
        "protocol": ("gamma and iteration count selected on validation classes; test evaluated once"
                     if val is not None else "fixed schedule and gamma; test evaluated once"),
        "selection": selection, **final,
        "checkpoints": {"best": str(out_dir / "best.pt"), "last": str(out_dir / "last.pt")},
        **({"tensorboard": str(board.dir)} if board is not None else {}),
    }
    run.write_summary(summary)
    return summary


def validation_run(config: TrainConfig, cache_path: str | Path, out_dir: str | Path, *, device: str = "auto",
                   max_memory: str | None = None, on_validation=None) -> dict:
    """The validation run and its selection alone (`msdn tune`'s objective), over the validation
    task's rows only, so no test image is read; writes config.json and metrics.jsonl into out_dir
    (no checkpoint) and returns the selection dict, as `train` computes it before its final run."""
    device = resolve_device(device)
    amp = choose_amp(config.amp, device).amp
    keep_freed_memory(True)
    with FeatureCache(cache_path) as cache:
        labels = np.asarray(cache.labels)
        splits, _ = usable_splits(cache)
        val = validation_split(labels, splits, config, cache_path)
        flipped = flipped_training_rows(cache, config.flip, val.train_rows)
        plan = feature_plan(cache, val.rows(), device, config, amp, max_memory=max_memory, flipped=flipped)
        run = RunLog(out_dir, overwrite=True)
        store = open_features(cache, val.rows(), device, config, amp, plan, run, flipped)
        run.write_config({**config.to_dict(), "run": {"cache": str(cache_path), "device": str(device), "amp": amp,
                                                      "features": plan, "tasks": [val.describe()]}})
        try:
            return select_on_validation(config, val, cache=cache, store=store, labels=labels, amp=amp, run=run,
                                        progress=False, on_validation=on_validation)
        except (DivergedError, CacheError) as err:
            run.log({"phase": "failed", "error": str(err)})
            raise


def validation_split(labels: np.ndarray, splits: dict, config: TrainConfig, cache_path, hint: str = "") -> Task:
    """The validation task of `config` (its held-out fraction and seed); a cache it cannot be made
    from is a CacheError naming the file."""
    try:
        return validation_task(labels, splits, held_out_fraction=config.val_seen_fraction, seed=config.seed)
    except ValueError as err:
        raise CacheError(f"{cache_path}: {err}{hint}") from None


def feature_plan(cache, rows: np.ndarray, device, config: TrainConfig, amp: str | None, *,
                 max_memory: str | None, flipped: np.ndarray | None = None) -> dict:
    """Resident bank or streaming for these rows (and `flipped`'s flipped maps) at the config's dtype and batches."""
    return memory_plan(cache, rows, device, bank_dtype(config.feature_dtype, amp), max_memory=max_memory,
                       batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
                       num_attributes=int(cache.att.shape[1]), flipped_rows=flipped)


def open_features(cache, rows: np.ndarray, device, config: TrainConfig, amp: str | None, plan: dict, run: RunLog,
                  flipped: np.ndarray | None = None):
    """The feature store of `plan`; NaN/inf rows are refused before training and recorded in the
    run's metrics.jsonl as a failed run."""
    try:
        return open_store(cache, rows, device, bank_dtype(config.feature_dtype, amp), plan,
                          batch_size=config.batch_size, eval_batch_size=config.eval_batch_size, flipped_rows=flipped)
    except CacheError as err:
        run.log({"phase": "failed", "error": str(err)})
        raise


def attribute_embeddings(cache, config: TrainConfig) -> str:
    """Where the heads' attribute embeddings V start: the cache's word vectors, or (a cache without
    w2v_att: FLO, APY, `msdn extract --w2v none`) a random N(0, 1) init that training learns."""
    if cache.w2v_att is None:
        return (f"random init N(0, 1), {config.head.w2v_dim}-d, trained (the cache has no word vectors: "
                "FLO/APY, or extracted with --w2v none)")
    return f"word vectors from the cache, {cache.w2v_att.shape[1]}-d" + ("" if config.head.trainable_v else ", frozen")


def select_on_validation(config: TrainConfig, val: Task, *, cache, store, labels, amp, run, progress,
                         log=None, board: TensorBoardLog | None = None,
                         on_validation: Callable[[int, dict], None] | None = None) -> dict:
    """The validation run and its selection. on_validation(step, record), if given, sees each
    validation evaluation as it is logged (`msdn tune` reports it to its study; an exception it
    raises, e.g. optuna's TrialPruned, stops the run there)."""
    model = build_model(config.head, cache, val, store.device, config.seed)
    history = []

    def on_eval(step: int, losses: dict) -> bool:
        report = evaluate_task(model, store, val, labels, gamma=config.gamma,
                               batch_size=config.eval_batch_size, amp=amp)
        record = {"phase": "val", "step": step, "losses": losses, **report}
        run.log(record)
        history.append(record)
        if log is not None:
            with above_bars():
                log(evaluation_line(step, config.iterations, report, losses))
        if board is not None:
            board.evaluation("validation", step, report, best_point=True)
        if on_validation is not None:
            on_validation(step, record)
        stop = should_stop(history, config)
        if stop and log is not None:
            with above_bars():
                log(f"early stop at step {step}: no better validation H in {config.patience} evaluations "
                    f"(patience; --set patience=0 runs all {config.iterations} steps)")
        return stop

    on_log = None if board is None else (lambda step, values: board.training("validation_run", step, values))
    timing = fit(model, store, val.train_rows, val.local_labels(labels[val.train_rows]), config,
                 steps=config.iterations, amp=amp, on_eval=on_eval, eval_every=config.eval_every,
                 desc="validation run", progress=progress, on_log=on_log)
    chosen = choose_evaluation(history) if config.select_iterations else history[-1]
    return {"mode": "val", "iteration": chosen["step"], "gamma": chosen["best"]["gamma"],
            "validation": {k: chosen[k] for k in ("ZSL", "AUSUC", "best")}, "task": val.describe(),
            "validation_steps": timing["steps"], "stopped_early": timing["steps"] < config.iterations,
            "train_seconds": timing["seconds"], "eval_seconds": timing["eval_seconds"]}


def should_stop(history: list[dict], config: TrainConfig) -> bool:
    """Early stopping: the last `patience` evaluations brought no strictly better (H, AUSUC) than the
    best before them. Only where the iteration count is selected (else the recipe's step is kept)."""
    if not config.patience or not config.select_iterations or len(history) <= config.patience:
        return False
    def score(r):
        return round(r["best"]["H"], 6), round(r["AUSUC"], 6)
    before = max(score(r) for r in history[:-config.patience])
    return all(score(r) <= before for r in history[-config.patience:])


def choose_evaluation(history: list[dict]) -> dict:
    """Highest validation H (each at its own best gamma), then AUSUC; remaining ties (e.g. a
    saturated validation set) go to the later step, i.e. towards the recipe's own schedule."""
    return max(history, key=lambda r: (round(r["best"]["H"], 6), round(r["AUSUC"], 6), r["step"]))


def train_final(config: TrainConfig, test: Task, selection: dict, identity: dict, *, cache, store, labels,
                amp, run, progress, paper_protocol: bool, log=None, board: TensorBoardLog | None = None) -> dict:
    model = build_model(config.head, cache, test, store.device, config.seed)
    chosen, gamma = selection["iteration"], selection["gamma"]
    steps = max(chosen, config.iterations) if paper_protocol else chosen
    out, paper = {}, {"best_H": None, "best_ZSL": None}

    def checkpoint(name: str, step: int, report: dict) -> None:
        save_checkpoint(run.dir / name, model=model, config=config.to_dict(), identity=identity,
                        gamma=gamma, iteration=step, metrics=scores_of(report))

    def on_eval(step: int, losses: dict) -> None:
        if step == chosen:
            report = evaluate_task(model, store, test, labels, gamma=gamma, batch_size=config.eval_batch_size,
                                   amp=amp, with_curve=True)
            write_json_atomic(run.dir / "curve.json", {"split": "test", "step": step, **report.pop("curve")})
            run.log({"phase": "test", "step": step, "selected": True, "losses": losses, **report})
            out["test"] = {**scores_of(report), "iteration": step}
            # the best point of the TEST curve is a test-set choice: kept only with the paper protocol's numbers
            paper["best_gamma_on_test"] = report["best"]
            out["test_gamma0"] = report.get("gamma0", {k: report[k] for k in ("U", "S", "H")})
            checkpoint("best.pt", step, report)
            if board is not None:
                board.evaluation("test", step, report, best_point=False)
        if paper_protocol and (step % config.eval_every == 0 or step == steps):
            report = evaluate_task(model, store, test, labels, gamma=0.0, batch_size=config.eval_batch_size, amp=amp)
            run.log({"phase": "test-paper-protocol", "step": step, "losses": losses, **report})
            if paper["best_H"] is None or report["H"] > paper["best_H"]["H"]:
                paper["best_H"] = {**scores_of(report), "iteration": step}
            if paper["best_ZSL"] is None or report["ZSL"] > paper["best_ZSL"]["ZSL"]:
                paper["best_ZSL"] = {"ZSL": report["ZSL"], "iteration": step}
        if step == steps:
            report = out["test"] if step == chosen else evaluate_task(
                model, store, test, labels, gamma=gamma, batch_size=config.eval_batch_size, amp=amp)
            if step != chosen:
                run.log({"phase": "test-last", "step": step, "losses": losses, **report})
                out["test_last"] = {**scores_of(report), "iteration": step}
            checkpoint("last.pt", step, report)

    timing = fit(model, store, test.train_rows, test.local_labels(labels[test.train_rows]), config,
                 steps=steps, amp=amp, on_eval=on_eval,
                 # the selected step is a multiple of eval_every or the recipe's last step
                 eval_every=config.eval_every if paper_protocol else chosen,
                 desc="final run", progress=progress,
                 on_log=None if board is None else (lambda step, values: board.training("final_run", step, values)))
    out["timing"] = {"final_train_seconds": timing["seconds"], "final_eval_seconds": timing["eval_seconds"],
                     "final_train_cpu_seconds": timing["cpu_seconds"],
                     "samples_per_s": timing["samples_per_s"]}
    if paper_protocol:
        out["paper_protocol"] = {**paper, "note": "selected on the TEST set (best of every evaluation), as the "
                                 "released MSDN scripts report; not an unbiased estimate"}
    return out


def summary_rows(summary: dict) -> dict[str, dict]:
    """Named result rows for the printed table."""
    rows = {}
    sel = summary.get("selection", {})
    if sel.get("mode") == "val":
        v = sel["validation"]
        rows["validation (selected)"] = {"ZSL": v["ZSL"], "AUSUC": v["AUSUC"], **v["best"]}
    if "test" in summary:
        rows["test"] = summary["test"]
        rows["test, gamma=0 (bias only)"] = {**summary["test_gamma0"], "gamma": 0.0}
    paper = summary.get("paper_protocol")
    if paper:
        rows["paper protocol: best H on test"] = paper["best_H"]
        rows["paper protocol: best ZSL on test"] = {"ZSL": paper["best_ZSL"]["ZSL"]}
    return rows
