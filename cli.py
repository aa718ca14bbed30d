"""`msdn` command line. Thin by design: each command parses options and calls into `pipeline/`."""
from __future__ import annotations

import contextlib
import math
import os

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """MSDN++ zero-shot learning: extract backbone features once, then train and evaluate in minutes."""


# ----------------------------------------------------------------------------- stage 1: extract
@main.command()
@click.option("--dataset", default="demo", show_default=True,
              help="CUB, SUN, AWA2, AWA1, APY, FLO (xlsa17), CUB100 (CUB-style folder) or demo.")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Feature cache to write [default: <dataset>_<backbone>_<size>.h5].")
@click.option("--data-root", default=None, help="Data folder [default: ./data; CUB100: the shared data folder].")
@click.option("--xlsa17-root", default=None, help="Folder with <DS>/att_splits.mat [default: <data-root>/xlsa17].")
@click.option("--w2v-root", default=None, help="Folder with <DS>_attribute.pkl [default: <data-root>/attribute_w2v].")
@click.option("--backbone", default="resnet101", show_default=True,
              type=click.Choice(["resnet101", "efficientnet_lite0"]))
@click.option("--image-size", default=448, show_default=True, type=int, help="Input side in pixels.")
@click.option("--weights", default="imagenet", show_default=True,
              help="imagenet, a local weights file, or random (tests only).")
@click.option("--batch-size", default=None, type=int, help="[default: chosen per device and backbone]")
@click.option("--device", default="auto", show_default=True, help="auto = cuda if available, else cpu.")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]),
              help="Stored feature dtype (float32 for MSDN/TransZero's own loaders).")
@click.option("--compression", default="lzf", show_default=True, type=click.Choice(["lzf", "gzip", "none"]))
@click.option("--workers", default=None, type=int, help="Image-decoding processes [default: per device].")
@click.option("--resume", is_flag=True, help="Continue an interrupted extraction (or retry skipped rows).")
@click.option("--skip-bad", is_flag=True, help="Record unreadable images as skipped instead of stopping.")
@click.option("--overwrite", is_flag=True, help="Replace an --out made from other inputs, or restart a partial one.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="Put the result into this feature store, keyed by content key [default: $MSDN_CACHE_DIR "
                   "when --out is not given]. Prints the key.")
@click.option("--materialize", is_flag=True,
              help="Under torchrun: join the ranks' shards into one file instead of a virtual dataset.")
def extract(dataset, out, data_root, xlsa17_root, w2v_root, backbone, image_size, weights, batch_size, device,
            dtype, compression, workers, resume, skip_bad, overwrite, no_progress, cache_dir, materialize):
    """Stream a dataset's images through a frozen backbone into one HDF5 feature cache."""
    from pipeline.extract_job import EXTRACT_ERRORS, ExtractOptions, run_extract

    options = ExtractOptions(dataset=dataset, out=out, data_root=data_root, xlsa17_root=xlsa17_root,
                             w2v_root=w2v_root, backbone=backbone, image_size=image_size, weights=weights,
                             batch_size=batch_size, device=device, dtype=dtype, compression=compression,
                             workers=workers, resume=resume, skip_bad=skip_bad, overwrite=overwrite,
                             progress=not no_progress)
    from cache.store import StoreError
    from extract.distributed import torchrun_world
    from pipeline.extract_scaled import run_extract_scaled, uses_store

    log = lambda msg: click.echo(msg, err=True)  # noqa: E731
    try:
        if uses_store(options, cache_dir) or torchrun_world() > 1:
            key = run_extract_scaled(options, cache_dir=cache_dir, materialize=materialize, log=log)
            if uses_store(options, cache_dir) and os.environ.get("RANK", "0") == "0":
                click.echo(key)  # once, not once per torchrun rank
        else:
            run_extract(options, log=log)
    except EXTRACT_ERRORS + (StoreError,) as err:
        raise click.ClickException(str(err)) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


# ----------------------------------------------------------------------------- stage 2: train / evaluate
def _stage2_errors():
    """Bad input raises one of these; the CLI shows its one-line message instead of a traceback."""
    from cache.reader import CacheError
    from pipeline.checkpoint import CheckpointError
    from pipeline.config import ConfigError
    from pipeline.runlog import RunFolderError
    return (CacheError, CheckpointError, ConfigError, RunFolderError)


@main.command()
@click.option("--recipe", required=True, help="Recipe name (CUB, SUN, AWA2, APY, FLO, CUB100, demo) or a .toml path.")
@click.option("--cache", "cache_path", required=True,
              help="Feature cache: a .h5 file (ours or TransZero's) or a store key / unique key prefix.")
@click.option("--cache-dir", default=None, help="Store to look keys up in [default: $MSDN_CACHE_DIR].")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder to create.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field, e.g. --set lambda_causal=0.3 (repeatable).")
@click.option("--device", default="auto", show_default=True, help="auto = cuda if available, else cpu.")
@click.option("--deterministic", is_flag=True, help="Deterministic algorithms (seeds are always fixed).")
@click.option("--paper-protocol", is_flag=True,
              help="Also report the released code's best-on-TEST numbers, labelled as such.")
@click.option("--overwrite", is_flag=True, help="Reuse an --out folder that already holds a run.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(recipe, cache_path, cache_dir, out_dir, overrides, device, deterministic, paper_protocol, overwrite, quiet):
    """Train the MSDN++ heads on a feature cache; select on validation classes; report on test."""
    from pipeline.cache_jobs import resolve_cache
    from pipeline.config import apply_overrides, load_recipe
    from pipeline.runlog import format_table
    from pipeline.train import summary_rows
    from pipeline.train import train as run_training

    try:
        config = apply_overrides(load_recipe(recipe), list(overrides))
        cache_path = resolve_cache(cache_path, cache_dir)
        summary = run_training(config, cache_path, out_dir, device=device, deterministic=deterministic,
                               paper_protocol=paper_protocol, progress=not quiet, overwrite=overwrite)
    except _stage2_errors() as err:
        raise click.ClickException(str(err)) from None
    click.echo(format_table(summary_rows(summary)))
    click.echo(f"run folder: {out_dir}")


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False), help="best.pt or last.pt.")
@click.option("--cache", "cache_path", required=True,
              help="The feature cache the checkpoint was trained on (a .h5 file or a store key).")
@click.option("--cache-dir", default=None, help="Store to look keys up in [default: $MSDN_CACHE_DIR].")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), help="Optional run folder.")
@click.option("--gamma", type=float, default=None, help="Calibrated-stacking gamma (default: the checkpoint's).")
@click.option("--device", default="auto", show_default=True, help="auto = cuda if available, else cpu.")
@click.option("--overwrite", is_flag=True, help="Reuse an --out folder that already holds a run.")
def evaluate(checkpoint, cache_path, cache_dir, out_dir, gamma, device, overwrite):
    """Evaluate a checkpoint on the test split of its cache (ZSL, GZSL U/S/H, AUSUC)."""
    from pipeline.cache_jobs import resolve_cache
    from pipeline.evaluate import evaluate as run_evaluation
    from pipeline.evaluate import evaluation_rows
    from pipeline.runlog import format_table

    try:
        summary = run_evaluation(checkpoint, resolve_cache(cache_path, cache_dir), out_dir=out_dir, device=device, gamma=gamma,
                                 overwrite=overwrite)
    except _stage2_errors() as err:
        raise click.ClickException(str(err)) from None
    click.echo(format_table(evaluation_rows(summary)))


@main.command()
@click.option("--cache", "cache_path", required=True, help="Feature cache: a .h5 file or a store key.")
@click.option("--cache-dir", default=None, help="Store to look keys up in [default: $MSDN_CACHE_DIR].")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder to create.")
@click.option("--method", default="eszsl", show_default=True, type=click.Choice(["eszsl"]))
@click.option("--overwrite", is_flag=True, help="Reuse an --out folder that already holds a run.")
def baseline(cache_path, cache_dir, out_dir, method, overwrite):
    """Linear baseline (ESZSL on pooled features), selected on validation, same metrics as train."""
    from pipeline.baselines import BaselineConfig, baseline_rows, run_baseline
    from pipeline.cache_jobs import resolve_cache
    from pipeline.runlog import format_table

    try:
        summary = run_baseline(resolve_cache(cache_path, cache_dir), out_dir, BaselineConfig(method=method),
                               overwrite=overwrite)
    except _stage2_errors() as err:
        raise click.ClickException(str(err)) from None
    click.echo(format_table(baseline_rows(summary)))
    click.echo(f"run folder: {out_dir}")


@main.command()
@click.option("--out", "out_dir", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the rendered images, the feature cache and the run.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a field of the demo recipe, e.g. --set lambda_causal=0.3 (repeatable).")
@click.option("--device", default="auto", show_default=True, help="auto = cuda if available, else cpu.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out_dir, overrides, device, quiet):
    """Render the demo set, extract features, train, evaluate, print the results table."""
    from pipeline.demo import run_demo
    from pipeline.evaluate import evaluation_rows
    from pipeline.extract_job import EXTRACT_ERRORS
    from pipeline.runlog import format_table

    try:
        result = run_demo(out_dir, device=device, overrides=overrides, progress=not quiet, log=click.echo)
    except EXTRACT_ERRORS + _stage2_errors() as err:
        raise click.ClickException(str(err)) from None
    click.echo(format_table(evaluation_rows(result["evaluate"])))
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in result["seconds"].items())
    click.echo(f"run folder: {result['run']}  ({timing})")


# ----------------------------------------------------------------------------- the team feature store
_STORE_OPTION = click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
                             help="The store [default: $MSDN_CACHE_DIR].")


@main.group()
def cache() -> None:
    """The content-addressed feature store: list, verify, copy between stores, export, clean up."""


@contextlib.contextmanager
def _one_line_errors():
    """Store problems as one line; Ctrl-C as exit 130 (interrupted copies resume on the next run)."""
    from cache.reader import CacheError
    from pipeline.config import ConfigError
    try:
        yield
    except (CacheError, ConfigError, OSError) as err:
        raise click.ClickException(str(err)) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


@cache.command("ls")
@_STORE_OPTION
@click.option("--match", "recipe", default=None, help="Only entries this recipe can train on (recipe name or .toml).")
@click.option("--full-keys", is_flag=True, help="Show whole keys, not 12-character prefixes.")
def cache_ls(cache_dir, recipe, full_keys):
    """Entries: key, dataset, backbone, size, shape, dtype, created, complete."""
    from pipeline.cache_jobs import list_entries, open_local_store

    with _one_line_errors():
        table = list_entries(open_local_store(cache_dir), match=recipe, full_keys=full_keys)
    click.echo("(no entries)" if table.empty else table.to_string(index=False))


@cache.command("verify")
@click.argument("target")
@_STORE_OPTION
def cache_verify(target, cache_dir):
    """Read every row of KEY (or a cache file PATH) and check it against its checksum.
    Exit code: 0 ok, 1 corrupt, 3 readable but no checksums, 4 incomplete."""
    from pipeline.cache_jobs import verify

    with _one_line_errors():
        report = verify(target, cache_dir)
    for line in report.lines():
        click.echo(line)
    raise SystemExit(report.exit_code)


@cache.command("push")
@click.argument("key")
@click.argument("dest")
@_STORE_OPTION
def cache_push(key, dest, cache_dir):
    """Copy entry KEY from the store to the store DEST (a directory, or an fsspec URL), verified."""
    from pipeline.cache_jobs import push
    _copy(push, key, dest, cache_dir)


@cache.command("pull")
@click.argument("key")
@click.argument("source")
@_STORE_OPTION
def cache_pull(key, source, cache_dir):
    """Copy entry KEY from the store SOURCE (a directory, or an fsspec URL) into the store, verified."""
    from pipeline.cache_jobs import pull
    _copy(pull, key, source, cache_dir)


def _copy(job, key, other_store, cache_dir):
    with _one_line_errors():
        click.echo(job(key, other_store, cache_dir, log=lambda msg: click.echo(msg, err=True)))


def _amount(ctx, param, value):
    """A finite number >= 0 (a negative age would select every entry, NaN none): else a usage error."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise click.BadParameter(f"{value} is not a number >= 0")
    return value


def _size(ctx, param, value):
    from cache.store import StoreError
    from pipeline.cache_jobs import parse_size

    try:
        return None if value is None else parse_size(value)
    except StoreError as err:
        raise click.BadParameter(str(err)) from None


@cache.command("gc")
@_STORE_OPTION
@click.option("--older-than", "days", type=float, default=None, callback=_amount,
              help="Also remove entries unused for DAYS.")
@click.option("--max-size", default=None, callback=_size,
              help="Also remove least recently used entries until the store fits, e.g. 200G.")
@click.option("--stale-hours", type=float, default=24.0, show_default=True, callback=_amount,
              help="Remove unlocked staging folders (interrupted work) untouched this long.")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
def cache_gc(cache_dir, days, max_size, stale_hours, dry_run):
    """Remove interrupted work nobody holds and, on request, old or least recently used entries."""
    from cache.gc import collect_garbage
    from pipeline.cache_jobs import open_local_store

    with _one_line_errors():
        removed = collect_garbage(open_local_store(cache_dir), stale_hours=stale_hours, older_than_days=days,
                                  max_bytes=max_size, dry_run=dry_run, log=click.echo)
    if not removed:
        click.echo("nothing to remove")


@cache.command("rm")
@click.argument("key")
@_STORE_OPTION
def cache_rm(key, cache_dir):
    """Remove entry KEY from the store (readers that have it open keep reading)."""
    from pipeline.cache_jobs import open_local_store

    with _one_line_errors():
        store = open_local_store(cache_dir)
        full = store.resolve(key)
        with store.lock(full):
            store.remove(full)
    click.echo(f"removed {full}")


@cache.command("export")
@click.argument("target")
@click.argument("file", type=click.Path(dir_okay=False))
@_STORE_OPTION
@click.option("--dtype", default=None, type=click.Choice(["float16", "float32"]),
              help="Feature dtype of the copy [default: as stored]; float32 for MSDN/TransZero's loaders.")
@click.option("--compression", default=None, type=click.Choice(["lzf", "gzip", "none"]),
              help="[default: as stored]")
def cache_export(target, file, cache_dir, dtype, compression):
    """Write entry KEY (or a cache PATH) as one self-contained file in TransZero's key layout."""
    from pipeline.cache_jobs import export

    with _one_line_errors():
        click.echo(export(target, file, dtype=dtype, compression=compression, cache_dir=cache_dir,
                          log=lambda msg: click.echo(msg, err=True)))


# ----------------------------------------------------------------------------- ablations, reports, pictures
def _csv(text: str | None, cast=str, option: str = "") -> list | None:
    try:
        return None if text is None else [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated {cast.__name__} values, got {text!r}",
                                 param_hint=option) from None


@main.command()
@click.option("--preset", default=None, help="A worked example: demo or cub100 (extracts its cache into --out once).")
@click.option("--recipe", default=None, help="Recipe name or .toml path [default: the preset's].")
@click.option("--cache", "cache_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Feature cache [default: the preset's, extracted into --out].")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Ablation folder.")
@click.option("--ablation", "ablations", default=None,
              help="Comma-separated built-in ablations, 'all' or 'none' [default: the preset's; all without --grid]. "
                   "Names: full, ava_only, vaa_only, no_distill, no_causal, no_calibration, cf_<type>, "
                   "test_ava, test_vaa, test_equal.")
@click.option("--grid", multiple=True, metavar="KEY=V1,V2",
              help="Config values to cross, e.g. --grid lambda_cal=0.05,0.1 --grid fusion=[1,0],[0.5,0.5] (repeatable).")
@click.option("--seeds", default=None, help="Comma-separated seeds [default: the preset's, else 0,1].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override for every cell (repeatable).")
@click.option("--workers", type=int, default=None,
              help="Parallel cells [default: one per GPU; on CPU min(cores, 4), cores shared evenly].")
@click.option("--device", default="auto", show_default=True, help="auto = cuda if available, else cpu.")
@click.option("--overwrite", is_flag=True, help="Redo cells whose folder holds a run of another config or cache.")
def ablate(preset, recipe, cache_path, out_dir, ablations, grid, seeds, overrides, workers, device, overwrite):
    """Train a grid of variants x seeds in parallel; write mean ± std tables (CSV, Markdown, LaTeX)."""
    from pipeline.ablate import AblationError
    from pipeline.ablate_job import AblateOptions, run_ablate
    from pipeline.extract_job import EXTRACT_ERRORS

    try:
        options = AblateOptions(out=out_dir, recipe=recipe, cache=cache_path, preset=preset, ablations=_csv(ablations),
                                grid=list(grid), seeds=_csv(seeds, int, "--seeds"), overrides=list(overrides),
                                workers=workers, device=device, overwrite=overwrite)
        result = run_ablate(options, log=lambda msg: click.echo(msg, err=True))
    except (AblationError, ValueError) + EXTRACT_ERRORS + _stage2_errors() as err:
        raise click.ClickException(str(err)) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None  # finished cells are kept; re-running resumes
    click.echo(result["paths"]["markdown"].read_text())
    failed = int((result["runs"]["status"] == "failed").sum())
    click.echo(f"tables: {out_dir}/results.{{md,tex,csv}}, runs.csv  ({result['seconds']:.0f} s"
               + (f"; {failed} cell(s) FAILED, see the error column of runs.csv)" if failed else ")"))
    if failed:
        raise SystemExit(1)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Write report.md, report.tex and report.csv here.")
@click.option("--no-published", is_flag=True, help="Leave out the published numbers.")
def report(paths, out_dir, no_published):
    """Tables across runs and datasets (run or ablation folders), with published numbers beside ours."""
    from pipeline.report import ReportError, build_report

    try:
        result = build_report(paths, out_dir=out_dir, published=not no_published)
    except ReportError as err:
        raise click.ClickException(str(err)) from None
    click.echo(result["markdown"])


@main.command()
@click.option("--run", "run_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="A `msdn train` run folder (its best.pt and cache are used).")
@click.option("--checkpoint", default=None, type=click.Path(exists=True, dir_okay=False), help="[default: <run>/best.pt]")
@click.option("--cache", "cache_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="[default: the cache recorded in <run>/config.json]")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), help="[default: <run>/pictures]")
@click.option("--images", default=4, show_default=True, help="Attention pictures: one test image of each of N classes.")
@click.option("--rows", default=None, help="Comma-separated cache rows to draw instead of --images.")
@click.option("--top-k", default=3, show_default=True, help="Attributes per attention picture.")
@click.option("--tsne-images", default=1000, show_default=True, help="Test images in the t-SNE (random subset).")
@click.option("--image-root", default=None, type=click.Path(exists=True, file_okay=False),
              help="Image folder, if the images moved since extraction.")
@click.option("--device", default="auto", show_default=True, help="auto = cuda if available, else cpu.")
def visualize(run_dir, checkpoint, cache_path, out_dir, images, rows, top_k, tsne_images, image_root, device):
    """PNG pictures: attention of top attributes over images, seen-unseen curve, t-SNE of features."""
    from pipeline.visualize import VisualizeError, resolve_inputs
    from pipeline.visualize import visualize as draw

    try:
        checkpoint, cache_path, out_dir = resolve_inputs(run_dir, checkpoint, cache_path, out_dir)
        draw(checkpoint, cache_path, out_dir, rows=_csv(rows, int, "--rows"), images=images, top_k=top_k,
             tsne_images=tsne_images, image_root=image_root, device=device, log=click.echo)
    except (VisualizeError,) + _stage2_errors() as err:
        raise click.ClickException(str(err)) from None


if __name__ == "__main__":
    main()
