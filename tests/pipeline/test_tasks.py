import numpy as np
import pytest

from cache.reader import CacheError, FeatureCache
from pipeline.tasks import benchmark_task, validation_task
from tests.fixtures.caches import write_tiny_cache


def test_benchmark_task_is_the_xlsa17_split(tiny_cache):
    with FeatureCache(tiny_cache) as c:
        task = benchmark_task(c.labels, c.splits, num_classes=24)
    assert task.seen.tolist() == list(range(20)) and task.unseen.tolist() == [20, 21, 22, 23]
    assert len(task.train_rows) == 80 and len(task.eval_seen_rows) == 40 and len(task.eval_unseen_rows) == 24


def test_overlapping_seen_and_unseen_classes_are_refused(tiny_cache):
    with FeatureCache(tiny_cache) as c:
        labels, splits = c.labels, dict(c.splits)
    splits["test_unseen_loc"] = np.r_[splits["test_unseen_loc"], splits["trainval_loc"][:1]]   # a seen class
    with pytest.raises(CacheError, match=r"classes \[0\] are both seen \(trainval_loc\) and unseen"):
        benchmark_task(labels, splits, num_classes=24)


def test_validation_task_never_touches_test_images(tiny_cache):
    with FeatureCache(tiny_cache) as c:
        labels, splits = c.labels, c.splits
    task = validation_task(labels, splits, held_out_fraction=0.25, seed=0)
    test_rows = np.concatenate([splits["test_seen_loc"], splits["test_unseen_loc"]])
    used = np.concatenate([task.train_rows, task.eval_seen_rows, task.eval_unseen_rows])
    assert not np.intersect1d(used, test_rows).size  # train_loc also lists test_seen rows: dropped
    assert len(np.unique(used)) == len(used)          # fit / held-out / val rows are disjoint
    assert task.classes.tolist() == list(range(20))  # test classes unknown to the validation model
    assert set(labels[task.eval_unseen_rows]) == set(range(14, 20))
    assert set(labels[task.train_rows]) == set(range(14))
    # 4 trainval images per class, a quarter held out per class
    assert np.bincount(labels[task.eval_seen_rows]).tolist() == [1] * 14
    assert np.array_equal(task.local_labels(np.arange(14, 20)), task.unseen)
    again = validation_task(labels, splits, held_out_fraction=0.25, seed=0)
    assert np.array_equal(again.eval_seen_rows, task.eval_seen_rows)


def test_validation_split_is_derived_when_the_cache_has_none(tmp_path):
    path = write_tiny_cache(tmp_path / "no_val.h5", with_val_split=False)
    with FeatureCache(path) as c:
        task = validation_task(c.labels, c.splits)
    assert "derived" in task.note and len(task.unseen) >= 1 and len(task.seen) >= 1
    assert not set(c.labels[task.train_rows]) & set(c.labels[task.eval_unseen_rows])


def test_overlapping_train_and_val_classes_are_refused(tiny_cache):
    with FeatureCache(tiny_cache) as c:
        splits = dict(c.splits, val_loc=c.splits["trainval_loc"])
        with pytest.raises(ValueError, match="disjoint"):
            validation_task(c.labels, splits)
