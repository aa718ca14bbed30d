"""`msdn visualize`: PNG pictures of a trained run.

  attention_<row>.png  the image, then one panel per top attribute (by AVA score) with its
                       attribute→visual attention laid over the image (+ attention_<row>.npz:
                       the maps in image pixels, for checking and re-plotting)
  curve.png            the seen-unseen accuracy curve over the calibration gamma, with AUSUC and
                       the selected operating point
  tsne.png             t-SNE of the attribute-based features (AVA attribute scores) of test images

matplotlib is an optional extra (`pip install "msdn-zsl[plot]"`), imported only here.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cache.errors import UserError
from cache.reader import FeatureCache
from cache.store import resolve_cache
from extract.devices import resolve_device
from pipeline.commands.attention import attribute_features, heat_in_image, load_trained, top_attribute_attention
from pipeline.checkpoint import load_checkpoint
from pipeline.features import ResidentFeatures
from pipeline.metrics import gzsl_accuracy, seen_unseen_curve
from pipeline.run_cache import find_cache


class VisualizeError(UserError, ValueError):
    """Missing plotting extra, images that cannot be found, or a run without a checkpoint."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise VisualizeError("msdn visualize needs matplotlib: pip install \"msdn-zsl[plot]\" "
                             "(or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def dataset_extras(cache: FeatureCache, image_root: str | Path | None = None) -> dict:
    """Image root, attribute and class names, boxes: from the dataset the cache was extracted from
    when it can be rebuilt (the manifest records it); names stored in the cache win; else neutral
    fallbacks."""
    extras = _rebuilt_extras(cache, image_root)
    if cache.class_names is not None:
        extras["class_names"] = list(cache.class_names)
    if cache.attribute_names is not None:
        extras["attribute_names"] = list(cache.attribute_names)
    return extras


def _rebuilt_extras(cache: FeatureCache, image_root: str | Path | None) -> dict:
    manifest = (cache.manifest or {}).get("dataset", {})
    num_classes, num_att = cache.att.shape
    extras = {"root": Path(image_root) if image_root else (Path(manifest["root"]) if "root" in manifest else None),
              "attribute_names": [f"attribute {i}" for i in range(num_att)],
              "class_names": [f"class {i}" for i in range(num_classes)], "boxes": None}
    source = manifest.get("source", {})
    if "name" in manifest and "root" in source:
        try:
            from extract.datasets import build_dataset
            options = {k: v for k, v in source.get("params", {}).items() if k != "version"}  # demo render
            ds = build_dataset(manifest["name"], root=source["root"], **options)
        except Exception:  # noqa: BLE001 - names are a nicety; the pictures work without them
            return extras
        if len(ds.image_paths) == cache.num_images:
            extras.update(class_names=list(ds.class_names), boxes=ds.boxes,
                          root=Path(image_root) if image_root else ds.root)
            if ds.attribute_names is not None:
                extras["attribute_names"] = list(ds.attribute_names)
    return extras


def resolve_inputs(run_dir, checkpoint, cache_path, out_dir, cache_dir=None,
                   trust_unverified: bool = False) -> tuple[Path, Path, Path]:
    """Checkpoint, cache (a file or a store key) and output folder from a run folder, unless given."""
    if run_dir is None and (checkpoint is None or cache_path is None or out_dir is None):
        raise VisualizeError("give --run, or all of --checkpoint, --cache and --out")
    run_dir = Path(run_dir) if run_dir else None
    checkpoint = Path(checkpoint) if checkpoint else run_dir / "best.pt"
    if not checkpoint.is_file():
        raise VisualizeError(f"{checkpoint}: no checkpoint (an unfinished or failed run?)")
    if cache_path is None:  # the run's: config.json's path, else by content key in the store
        return checkpoint, find_cache(checkpoint, load_checkpoint(checkpoint, trust_unverified=trust_unverified), None, cache_dir), \
            Path(out_dir) if out_dir else run_dir / "pictures"
    return checkpoint, resolve_cache(cache_path, cache_dir), Path(out_dir) if out_dir else run_dir / "pictures"


def pick_rows(task, labels: np.ndarray, count: int) -> np.ndarray:
    """The first test image of `count` different unseen classes (then seen ones): deterministic."""
    picked, used = [], set()
    for row in list(task.eval_unseen_rows) + list(task.eval_seen_rows):
        if labels[row] not in used:
            picked.append(int(row))
            used.add(labels[row])
        if len(picked) == count:
            break
    return np.array(picked, dtype=np.int64)


def visualize(checkpoint: str | Path, cache_path: str | Path, out_dir: str | Path, *, rows=None, images: int = 4,
              top_k: int = 3, tsne_images: int = 1000, image_root: str | Path | None = None,
              device: str = "auto", trust_unverified: bool = False, log=print) -> list[Path]:
    """Write the pictures for `checkpoint` (trained on `cache_path`) into out_dir; return the paths."""
    plt = _pyplot()
    out_dir, device = Path(out_dir), resolve_device(device)
    written = []
    with FeatureCache(cache_path) as cache:
        if cache.image_paths is None:
            raise VisualizeError(f"{cache_path}: the cache records no image paths (a TransZero-written file?): "
                                 "attention pictures need the images")
        head = load_trained(checkpoint, cache, device, trust_unverified=trust_unverified)
        labels = np.asarray(cache.labels)
        extras = dataset_extras(cache, image_root)
        rows = pick_rows(head.task, labels, images) if rows is None else np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= cache.num_images):
            raise VisualizeError(f"--rows must lie in [0, {cache.num_images}) for {cache_path}")
        out_dir.mkdir(parents=True, exist_ok=True)
        size = int((cache.manifest or {}).get("backbone", {}).get("image_size") or 0)
        if head.model.use_ava and rows.size:
            if not size:
                raise VisualizeError(f"{cache_path}: no backbone image size in the manifest")
            for att in top_attribute_attention(head, cache, rows, top_k):
                written += _attention_picture(plt, att, cache, extras, labels, size, out_dir)
        elif rows.size:
            log("no attention pictures: this head has no attribute→visual sub-net")
        test_rows = np.concatenate([head.task.eval_seen_rows, head.task.eval_unseen_rows])
        store = ResidentFeatures(cache, test_rows, device, "float16", max_batch=256)
        features, scores = attribute_features(head, store, test_rows)
    written.append(_curve_picture(plt, head, labels, test_rows, scores, out_dir))
    written.append(_tsne_picture(plt, head, labels, test_rows, features, extras, tsne_images, out_dir))
    for path in written:
        log(f"wrote {path}")
    return written


def _attention_picture(plt, att, cache, extras, labels, size, out_dir) -> list[Path]:
    from PIL import Image

    from extract.loader import UNREADABLE
    if extras["root"] is None:
        raise VisualizeError(f"{cache.path}: no image root in the manifest; pass --image-root")
    path = extras["root"] / cache.image_paths[att.row]
    try:
        image = Image.open(path).convert("RGB")
    except UNREADABLE as err:
        raise VisualizeError(f"{path}: cannot read the image ({err}); pass --image-root if the images moved") from None
    heats = np.stack([heat_in_image(g, image.width, image.height, size) for g in att.grids])
    names = extras["attribute_names"]
    fig, axes = plt.subplots(1, len(heats) + 1, figsize=(3.2 * (len(heats) + 1), 3.4))
    axes[0].imshow(image)
    box = None if extras["boxes"] is None else extras["boxes"][att.row]
    if box is not None:
        axes[0].add_patch(plt.Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, color="lime", lw=1.5))
    classes = extras["class_names"]
    axes[0].set_title(f"{classes[labels[att.row]]}\npredicted: {classes[att.predicted]}", fontsize=8)
    for ax, heat, a, score in zip(axes[1:], heats, att.attributes, att.scores):
        ax.imshow(image)
        ax.imshow(heat / max(heat.max(), 1e-12), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.set_title(f"{names[a]}\nscore {score:.2f}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    png, npz = out_dir / f"attention_{att.row}.png", out_dir / f"attention_{att.row}.npz"
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    np.savez_compressed(npz, heat=heats, attributes=att.attributes, scores=att.scores, row=att.row,
                        box=np.asarray(box if box is not None else [], dtype=np.float32))
    return [png, npz]


def _curve_picture(plt, head, labels, test_rows, scores, out_dir) -> Path:
    task, seen_rows = head.task, len(head.task.eval_seen_rows)
    y = task.local_labels(labels[test_rows])
    curve = seen_unseen_curve(scores[:seen_rows], y[:seen_rows], scores[seen_rows:], y[seen_rows:], task.seen, task.unseen)
    gamma = head.checkpoint["gamma"]
    s_at = gzsl_accuracy(scores[:seen_rows], y[:seen_rows], task.seen, gamma)
    u_at = gzsl_accuracy(scores[seen_rows:], y[seen_rows:], task.seen, gamma)
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot(100 * curve.seen_acc, 100 * curve.unseen_acc, lw=1.5)
    ax.plot([100 * s_at], [100 * u_at], "o", color="crimson", label=f"selected gamma {gamma:.2f}")
    ax.set(xlabel="seen accuracy S (%)", ylabel="unseen accuracy U (%)", xlim=(0, 100), ylim=(0, 100),
           title=f"seen-unseen curve, AUSUC {100 * curve.ausuc:.2f}")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path = out_dir / "curve.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    (out_dir / "curve.json").write_text(json.dumps({"AUSUC": curve.ausuc, **curve.to_dict()}))
    return path


def _tsne_picture(plt, head, labels, test_rows, features, extras, max_images, out_dir) -> Path:
    from sklearn.manifold import TSNE

    pick = np.random.default_rng(0).permutation(len(test_rows))[:max_images]
    emb = TSNE(n_components=2, perplexity=float(min(30, max(2, len(pick) // 4))), init="pca",
               random_state=0).fit_transform(features[pick])
    classes = labels[test_rows[pick]]
    unseen = np.isin(classes, head.task.classes[head.task.unseen])
    fig, ax = plt.subplots(figsize=(5.5, 5))
    cmap = plt.get_cmap("tab20")
    colours = cmap(np.searchsorted(np.unique(classes), classes) % 20)
    ax.scatter(emb[~unseen, 0], emb[~unseen, 1], c=colours[~unseen], s=8, marker="o")
    ax.scatter(emb[unseen, 0], emb[unseen, 1], c=colours[unseen], s=14, marker="x")
    ax.set(xticks=[], yticks=[], title="t-SNE of attribute-based features (test images)\n"
           "colour = class; o seen classes, x unseen classes")
    fig.tight_layout()
    path = out_dir / "tsne.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
