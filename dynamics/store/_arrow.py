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


def _strings(labels: list[str], codes: np.ndarray) -> pa.Array:
    """The string array ``labels[codes]``: rows are gathered from a padded byte matrix of the few
    distinct labels (numpy, about 10x faster here than pyarrow's dictionary cast or take)."""
    encoded = [s.encode("utf-8") for s in labels]
    lengths = np.array([len(b) for b in encoded], dtype=np.int64)
    width = max(1, int(lengths.max(initial=0)))
    padded = np.zeros((len(encoded), width), dtype=np.uint8)
    for i, b in enumerate(encoded):
        padded[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    row_lengths = lengths[codes]
    offsets = np.zeros(len(codes) + 1, dtype=np.int32)
    np.cumsum(row_lengths, out=offsets[1:])
    data = padded[codes][np.arange(width) < row_lengths[:, None]]
    return pa.Array.from_buffers(
        pa.string(), len(codes), [None, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(data))]
    )


def string_array(values: np.ndarray | list[str], *, repeat: int | None = None) -> pa.Array:
    """A string array of ``values`` (a column of few distinct labels, as metric and task names are).

    With ``repeat``, ``values`` is one label repeated ``repeat`` times.
    """
    if repeat is not None:
        label = str(values[0]).encode("utf-8")
        offsets = (np.arange(repeat + 1, dtype=np.int64) * len(label)).astype(np.int32)
        return pa.Array.from_buffers(
            pa.string(), repeat, [None, pa.py_buffer(offsets), pa.py_buffer(label * repeat)]
        )
    column = np.asarray(values, dtype=object)
    labels = sorted(set(column.tolist()))
    if len(labels) <= 64:  # the usual case: one comparison pass per label beats sorting strings
        codes = np.zeros(len(column), dtype=np.int64)
        for code, label in enumerate(labels[1:], start=1):
            codes[column == label] = code
        return _strings(labels, codes)
    uniq, inverse = np.unique(column.astype(str), return_inverse=True)
    return _strings([str(u) for u in uniq], inverse.reshape(-1))


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
