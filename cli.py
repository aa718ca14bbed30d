"""`msdn` command line. Thin by design: each command parses options and calls into `pipeline/`."""
from __future__ import annotations

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
def extract(dataset, out, data_root, xlsa17_root, w2v_root, backbone, image_size, weights, batch_size, device,
            dtype, compression, workers, resume, skip_bad, overwrite, no_progress):
    """Stream a dataset's images through a frozen backbone into one HDF5 feature cache."""
    from pipeline.extract_job import EXTRACT_ERRORS, ExtractOptions, run_extract

    options = ExtractOptions(dataset=dataset, out=out, data_root=data_root, xlsa17_root=xlsa17_root,
                             w2v_root=w2v_root, backbone=backbone, image_size=image_size, weights=weights,
                             batch_size=batch_size, device=device, dtype=dtype, compression=compression,
                             workers=workers, resume=resume, skip_bad=skip_bad, overwrite=overwrite,
                             progress=not no_progress)
    try:
        run_extract(options, log=lambda msg: click.echo(msg, err=True))
    except EXTRACT_ERRORS as err:
        raise click.ClickException(str(err)) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
