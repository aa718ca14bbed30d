"""What `msdn train` prints: the validation split, each validation evaluation, the selection."""
from __future__ import annotations

from pipeline.config import TrainConfig
from pipeline.tasks import Task

MIN_VALIDATION_CLASSES = 3  # below it, validation ZSL picks among 1 or 2 classes


def validation_line(val: Task | None) -> str:
    """Which classes validate, and where that split came from (see pipeline/tasks.py): a line,
    then each part of the split's note indented on its own, so that a log keeps short lines."""
    if val is None:
        return "validation: none (selection = fixed: the recipe's iterations and gamma)"
    few = [] if len(val.unseen) >= MIN_VALIDATION_CLASSES else [
        f"warning: {len(val.unseen)} validation class(es): validation ZSL is trivial there (chance "
        f"{100 / len(val.unseen):.0f}%), so the step and gamma it selects say little; mark more classes 'val' "
        "(folder: classes.csv) or give the dataset more seen classes"]
    return "\n  ".join([f"validation: {len(val.unseen)} validation classes and {len(val.seen)} seen classes "
                        f"({len(val.train_rows)} training, {len(val.eval_seen_rows)} + {len(val.eval_unseen_rows)} "
                        "evaluation images)", *val.note.split("; "), *few])


def evaluation_line(step: int, steps: int, report: dict, losses: dict) -> str:
    """One short line per validation evaluation: U, S, H at its best gamma, as the selection reads them."""
    best = report["best"]
    loss = f", loss {losses['loss']:.3f}" if losses.get("loss") is not None else ""
    return (f"validation step {step}/{steps}: ZSL {100 * report['ZSL']:.2f}, U {100 * best['U']:.2f}, "
            f"S {100 * best['S']:.2f}, H {100 * best['H']:.2f} (gamma {best['gamma']:.3g}), "
            f"AUSUC {100 * report['AUSUC']:.2f}{loss}")


def selection_line(selection: dict, config: TrainConfig, *, paper_protocol: bool) -> str:
    """What the final run will do, and why: the step and gamma chosen, with the validation H."""
    steps = max(selection["iteration"], config.iterations) if paper_protocol else selection["iteration"]
    then = f"final run on trainval: {steps} steps, then the test split"
    if selection["mode"] != "val":
        return f"selection: fixed (recipe): step {selection['iteration']}, gamma {selection['gamma']:.3g}; {then}"
    v = selection["validation"]
    step = (f"step {selection['iteration']}" if config.select_iterations
            else f"step {selection['iteration']} (the recipe's; select_iterations = false)")
    return (f"selected on validation: {step}, gamma {selection['gamma']:.3g}, "
            f"validation H {100 * v['best']['H']:.2f} (ZSL {100 * v['ZSL']:.2f}); {then}")
