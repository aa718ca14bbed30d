"""`msdn train --tensorboard`: losses, rates and validation metrics as TensorBoard scalars.

    tensorboard --logdir runs/cub/tensorboard

Written into <run folder>/tensorboard/ by torch.utils.tensorboard's SummaryWriter (the optional
extra `pip install "msdn-zsl[tb]"`). Tags, with the training step as the x axis:

    validation_run/loss, validation_run/<loss term>, validation_run/samples_per_s
    final_run/loss, final_run/<loss term>, final_run/samples_per_s
    validation/ZSL, validation/U, validation/S, validation/H, validation/gamma, validation/AUSUC
    test/ZSL, test/U, test/S, test/H, test/gamma, test/AUSUC   (once, at the selected step)

U, S and H of a validation point are at its best calibration gamma, as the selection reads them;
the test split's at the gamma selected on validation. ZSL, U, S, H and AUSUC are in percent, as the
console prints them (the JSON files keep fractions: docs/changes.md); gamma as is.
The loss terms arrive at the training loop's existing host read-back (every log_every steps,
pipeline/engine.py: fit's on_log), already on the host: the writer adds no device synchronisation,
and its file writes happen on SummaryWriter's own thread.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.config import ConfigError

SUBFOLDER = "tensorboard"
INSTALL_HINT = 'pip install "msdn-zsl[tb]"'


def summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter, or a ConfigError naming the install command."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises ImportError itself when the tensorboard package is missing
        raise ConfigError(f"--tensorboard needs the tensorboard package: {INSTALL_HINT} "
                          "(or pip install tensorboard)") from None
    return SummaryWriter


class TensorBoardLog:
    """Scalars of one `msdn train` run (see the module docstring for the tags)."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / SUBFOLDER
        self.writer = summary_writer_class()(log_dir=str(self.dir))

    def training(self, run: str, step: int, values: dict) -> None:
        """One read-back of the training loop: mean loss terms of the interval and samples/s."""
        for name, value in values.items():
            self.writer.add_scalar(f"{run}/{name}", float(value), step)

    def evaluation(self, split: str, step: int, report: dict, *, best_point: bool) -> None:
        """ZSL, AUSUC and U, S, H, gamma of an evaluation (pipeline/metrics.py: gzsl_report): at
        its best-H gamma (best_point: validation, as the selection reads it) or at the gamma it
        was evaluated with (the test split, at the gamma chosen on validation)."""
        point = report["best"] if best_point else report
        for name, value in (("ZSL", report["ZSL"]), ("U", point["U"]), ("S", point["S"]), ("H", point["H"]),
                            ("gamma", point["gamma"]), ("AUSUC", report["AUSUC"])):
            self.writer.add_scalar(f"{split}/{name}", float(value) * (1 if name == "gamma" else 100), step)
        self.writer.flush()  # an evaluation is rare: make it visible now

    def close(self) -> None:
        self.writer.close()
