"""A safetensors file written one array at a time: the header (every name, dtype and shape) first,
then each array's bytes as it comes, so the writer holds one array, never the whole file's.

A sharded run's rank 0 writes its checkpoints this way (training/parallel/layout.py gathers one
parameter or optimizer slot at a time and hands it here): `mx.save_safetensors` takes every array
at once, which would put the whole model and its optimizer state on rank 0 at each save, more
than one process training the model holds. `mx.load` and every verb read the file as they read
`mx.save_safetensors`' (the same arrays and `format: mlx` metadata; the header padded to 8 bytes
as the format asks), tests/test_sharded_training.py checks it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

# safetensors' names of MLX's dtypes
DTYPES = {mx.bool_: "BOOL", mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16",
          mx.uint32: "U32", mx.int32: "I32", mx.uint64: "U64", mx.int64: "I64",
          mx.float16: "F16", mx.bfloat16: "BF16", mx.float32: "F32", mx.float64: "F64"}


class StreamedSafetensors:
    """`path` opened for `entries` (name, shape, dtype) in order; `write` each array in that
    order, then `close` (fsynced; OSError when the file is short: a full disk)."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...], mx.Dtype]]) -> None:
        header: dict = {"__metadata__": {"format": "mlx"}}
        offset = 0
        for name, shape, dtype in entries:
            size = math.prod(shape) * dtype.size
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.path, self.expected = Path(path), 8 + len(text) + offset
        self._order = [(name, tuple(shape), dtype) for name, shape, dtype in entries]
        self._next = 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._file.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, array: mx.array) -> None:
        """The next entry's bytes (`array` evaluated here)."""
        want = self._order[self._next]
        if (name, tuple(array.shape), array.dtype) != want:
            raise ValueError(f"{self.path.name}: got {name} {tuple(array.shape)} {array.dtype}, "
                             f"the header's next entry is {want}")
        self._next += 1
        # numpy has no bfloat16: its bytes as 16-bit integers
        host = np.asarray(array.view(mx.uint16) if array.dtype == mx.bfloat16 else array)
        self._file.write(np.ascontiguousarray(host).data)

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        actual = self.path.stat().st_size
        if self._next != len(self._order) or actual != self.expected:
            raise OSError(errno.ENOSPC, f"{self.path.name} is {actual} bytes with "
                          f"{self._next} of {len(self._order)} arrays, expected {self.expected}")

    def abandon(self) -> None:
        """Close without the checks (a failed save: the folder holding it is removed)."""
        self._file.close()
