"""A restricted unpickler for the CIFAR-10 python batches: numpy arrays of plain dtypes, nothing else.

The official batches are pickles, and a pickle can name any importable callable. We allow only the
constructors numpy uses to rebuild an ndarray (per pickle protocol), and refuse object dtypes (whose elements would be
further pickles), so loading a batch can never run code from the file.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np

from cifarbench.errors import DataError


def _plain_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed")
    return dtype


def _reconstruct(*args: Any) -> np.ndarray:
    # numpy moved this between modules (numpy.core -> numpy._core); both spell the same function.
    return np.ndarray.__new__(*args)


def _frombuffer(buffer: Any, dtype: Any, shape: tuple, order: str) -> np.ndarray:
    # How numpy >= 2 pickles arrays with protocol 5.
    return np.frombuffer(buffer, dtype=_plain_dtype(dtype)).reshape(shape, order=order)


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # How python 3 spells a bytes payload in protocol 2; only the codec numpy uses is allowed.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"codec '{encoding}' is not allowed")
    return text.encode("latin1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array-reconstruction globals."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed") from None


def safe_load_pickle(payload: bytes, source: str) -> Any:
    """Unpickle `payload` (py2 or py3 pickle) with the restricted unpickler; errors name `source`."""
    try:
        # latin1 is the documented way to read python-2 str payloads (array bytes) losslessly.
        obj = RestrictedUnpickler(io.BytesIO(payload), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{source}: refused to unpickle: {exc}") from None
    except Exception as exc:  # truncated or malformed pickles raise many types
        raise DataError(f"{source}: not a readable CIFAR batch ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise DataError(f"{source}: refused to unpickle: object arrays are not allowed")
    return obj
