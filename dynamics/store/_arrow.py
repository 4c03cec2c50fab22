"""Arrow arrays to and from numpy for the training side, built on buffers.

Why not ``pa.array`` / ``to_numpy`` / ``to_pylist``: on first use they probe for pandas and import
it (about a second, and the import an exit-time flush once blocked on). Building arrays from
buffers and reading columns through their buffers keeps the writer on pyarrow and numpy alone.
The store never writes nulls, so validity bitmaps are absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["float64_array", "int64_array", "numeric_values", "read_parquet", "string_array", "string_values"]


def _numeric(values: np.ndarray, arrow_type: pa.DataType, dtype: type[np.generic]) -> pa.Array:
    v = np.ascontiguousarray(values, dtype=dtype)
    return pa.Array.from_buffers(arrow_type, len(v), [None, pa.py_buffer(v)])


def int64_array(values: np.ndarray) -> pa.Array:
    return _numeric(values, pa.int64(), np.int64)


def float64_array(values: np.ndarray) -> pa.Array:
    return _numeric(values, pa.float64(), np.float64)


def _utf8(labels: list[str]) -> pa.Array:
    encoded = [s.encode("utf-8") for s in labels]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return pa.Array.from_buffers(
        pa.string(), len(encoded), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]
    )


def string_array(values: np.ndarray | list[str], *, repeat: int | None = None) -> pa.Array:
    """A string array of ``values`` (few distinct labels: dictionary-encoded, then decoded by a cast).

    With ``repeat``, ``values`` is one label repeated ``repeat`` times.
    """
    if repeat is not None:
        labels, codes = [str(values[0])], np.zeros(repeat, dtype=np.int32)
    else:
        uniq, inverse = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
        labels, codes = [str(u) for u in uniq], inverse.astype(np.int32).reshape(-1)
    indices = _numeric(codes, pa.int32(), np.int32)
    return pa.DictionaryArray.from_arrays(indices, _utf8(labels)).cast(pa.string())


def numeric_values(column: pa.ChunkedArray, dtype: type[np.generic]) -> np.ndarray:
    """A numeric column as one numpy array (a copy)."""
    size = np.dtype(dtype).itemsize
    chunks = [
        np.frombuffer(c.buffers()[1], dtype=dtype, count=len(c), offset=c.offset * size)
        for c in column.chunks
    ]
    return np.concatenate(chunks) if chunks else np.empty(0, dtype=dtype)


def string_values(column: pa.ChunkedArray) -> list[str]:
    """A string column as a list of str."""
    out: list[str] = []
    for c in column.chunks:
        buffers = c.buffers()
        offsets = np.frombuffer(buffers[1], dtype=np.int32, count=len(c) + 1, offset=c.offset * 4)
        data = buffers[2].to_pybytes() if buffers[2] is not None else b""
        out.extend(data[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(c)))
    return out


def read_parquet(path: Path) -> pa.Table:
    """A whole Parquet file (``ParquetFile.read`` does not look for pandas metadata)."""
    with pq.ParquetFile(path) as f:
        return f.read()
