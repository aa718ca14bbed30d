import os
import pickle

import numpy as np
import pytest

from extract.safe_pickle import UnsafePickleError, load_numpy_pickle


@pytest.mark.parametrize("ds, shape", [("CUB", (312, 300)), ("SUN", (102, 300)), ("AWA2", (85, 300))])
def test_real_word_vector_pickles_load_and_equal_npy(shared_data, ds, shape):
    w2v_dir = shared_data / "attribute_w2v"
    from_pickle = load_numpy_pickle(w2v_dir / f"{ds}_attribute.pkl")
    from_npy = load_numpy_pickle(w2v_dir / f"{ds}_attribute_w2v.npy")
    assert from_pickle.shape == shape and from_pickle.dtype == np.float64
    np.testing.assert_array_equal(from_pickle, from_npy)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_pickles_of_every_protocol_round_trip(tmp_path, protocol):
    array = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    path = tmp_path / "a.pkl"
    path.write_bytes(pickle.dumps(array, protocol=protocol))
    np.testing.assert_array_equal(load_numpy_pickle(path), array)


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_a_command_is_refused_before_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_attribute.pkl"
    path.write_bytes(pickle.dumps(_RunsShell(marker)))
    # Sanity: the file really does run the command under a plain pickle.load.
    other = tmp_path / "proof"
    pickle.loads(pickle.dumps(_RunsShell(other)))
    assert other.exists()

    with pytest.raises(UnsafePickleError) as err:
        load_numpy_pickle(path)
    assert not marker.exists()
    message = str(err.value)
    assert str(path) in message and "system" in message


def test_builtins_eval_is_refused(tmp_path):
    path = tmp_path / "eval.pkl"
    path.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        load_numpy_pickle(path)


def test_non_array_and_object_arrays_are_refused(tmp_path):
    path = tmp_path / "dict.pkl"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UnsafePickleError, match="found dict"):
        load_numpy_pickle(path)
    npy = tmp_path / "obj.npy"
    np.save(npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UnsafePickleError, match=str(npy)):
        load_numpy_pickle(npy)


def test_truncated_and_missing_files_give_clear_errors(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps(np.ones((3, 3)))[:40])
    with pytest.raises(UnsafePickleError, match="cannot read"):
        load_numpy_pickle(path)
    with pytest.raises(FileNotFoundError, match="nothere.pkl"):
        load_numpy_pickle(tmp_path / "nothere.pkl")
