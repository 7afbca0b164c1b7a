"""Arrays: .npy files read exactly as numpy writes them, whatever their alignment."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from service.arrays import read_npy


def _unpadded_npy(array: np.ndarray) -> bytes:
    """A valid .npy whose data starts at an odd offset (np.save pads the header; clients need not)."""
    header = f"{{'descr': '{array.dtype.str}', 'fortran_order': False, 'shape': {array.shape}, }}".encode()
    header += b" " * (len(header) % 2) + b"\n"  # 10 + len(header) odd
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + array.tobytes()


@pytest.mark.parametrize(
    "array",
    [
        np.random.default_rng(0).random((3, 784), dtype=np.float32),
        np.asfortranarray(np.arange(3 * 784).reshape(3, 784) % 2).astype(">i2", order="F"),
        np.arange(2 * 784, dtype=np.uint8).reshape(2, 1, 28, 28),
        np.asfortranarray(np.random.default_rng(1).random((2, 1, 28, 28))),
        np.zeros((0, 784), dtype=np.float32),
    ],
    ids=["c-float32", "fortran-big-endian-int16", "uint8-4d", "fortran-float64-4d", "empty"],
)
@pytest.mark.parametrize("version", [(1, 0), (2, 0)], ids=["v1", "v2"])
def test_read_npy_reads_what_np_save_writes(array: np.ndarray, version: tuple[int, int]) -> None:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version)
    got = read_npy(buffer.getvalue())
    assert got.dtype == array.dtype and got.shape == array.shape
    assert (got.flags.c_contiguous, got.flags.f_contiguous) == (
        array.flags.c_contiguous,
        array.flags.f_contiguous,
    )
    np.testing.assert_array_equal(got, array)


def test_read_npy_aligns_data_an_unpadded_header_left_unaligned() -> None:
    array = np.random.default_rng(2).random((2, 784), dtype=np.float32)
    body = _unpadded_npy(array)
    assert np.frombuffer(body, np.uint8)[len(body) - array.nbytes :].ctypes.data % 4  # the data is unaligned
    got = read_npy(body)
    assert got.flags.aligned
    np.testing.assert_array_equal(got, array)
