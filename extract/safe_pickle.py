"""Load attribute word-vector files that come from strangers without running their code.

The `w2v/<DS>_attribute.pkl` files that DAZLE/TransZero/MSDN share are plain pickled numpy arrays.
`pickle.load` would run any callable the file names, so we unpickle with a whitelist holding only
what numpy's own array pickles reference (all of them build data, none runs user code), and we
check the result is a numeric ndarray. `.npy` files are read with `allow_pickle=False`.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """The file names a global outside the numpy-array whitelist (or is not a numeric array)."""


def _numpy_internal(name: str):
    # numpy >= 2 moved `numpy.core` to `numpy._core`; old pickles still name `numpy.core`.
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    return {"_reconstruct": multiarray._reconstruct, "_frombuffer": numeric._frombuffer}[name]


# (module, name) -> object. Protocol 2 pickles encode raw bytes via `_codecs.encode(str, "latin1")`;
# protocol 5 pickles rebuild arrays with `_frombuffer` (a reshape of a bytes buffer).
_ALLOWED = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_internal("_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_internal("_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_internal("_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_internal("_frombuffer"),
    ("_codecs", "encode"): lambda: __import__("_codecs").encode,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise UnsafePickleError(
                f"{self._path}: refused to unpickle global '{module}.{name}' (only plain numpy "
                "arrays are accepted; convert the file to .npy if you trust it)")
        return factory()


def load_numpy_pickle(path: str | Path) -> np.ndarray:
    """Load a numeric numpy array from `.pkl`/`.pickle` (restricted unpickler) or `.npy` (no pickle).

    Raises UnsafePickleError naming the file and the refused global, or when the file holds
    anything other than a numeric ndarray.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: word-vector file not found")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:  # object arrays need pickle: refuse
            raise UnsafePickleError(f"{path}: not a plain numeric .npy array ({err})") from None
    else:
        with open(path, "rb") as f:
            try:
                array = _NumpyOnlyUnpickler(f, path).load()
            except UnsafePickleError:
                raise
            except Exception as err:  # truncated / not a pickle at all
                raise UnsafePickleError(f"{path}: cannot read as a numpy pickle ({type(err).__name__}: {err})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        what = f"array of dtype {array.dtype}" if isinstance(array, np.ndarray) else type(array).__name__
        raise UnsafePickleError(f"{path}: expected a numeric numpy array, found {what}")
    return array
