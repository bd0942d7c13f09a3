"""What SimpleITK does not check in a single-file NIfTI (.nii, .nii.gz), read from the file itself.

ITK's NIfTI reader reads a file cut short with its missing voxels as zeros, a zero-length dimension as length
1, and NaN and infinite voxels as 0, all without a word. `check_nifti` refuses the first two and finds the third,
so that they can be counted and treated as every other reader's NaN are (`clisc.readers.replace_non_finite`).
"""
from __future__ import annotations

import gzip
import itertools
import math
import struct
import zlib
from pathlib import Path
from typing import Iterable, NamedTuple, Optional

import numpy as np

from .errors import InputError

CHUNK_BYTES = 1 << 24
FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64
# Single-file NIfTI headers: (sizeof_hdr, magic offset, magic, dim format, dim offset, datatype offset, vox_offset
# format, vox_offset offset); bitpix follows datatype. The byte order is the one in which sizeof_hdr reads right.
NIFTI_HEADERS = ((348, 344, b"n+1\0", "8h", 40, 70, "f", 108), (540, 4, b"n+2\0", "8q", 16, 12, "q", 168))


class Layout(NamedTuple):
    shape: tuple[int, ...]       # voxels along x, y, z, ...
    offset: int                  # vox_offset: where the voxels start, in bytes
    end: int                     # bytes up to the end of the voxels
    float_type: Optional[np.dtype]  # the voxels' type when they are floats (with the file's byte order)


class NonFinite(NamedTuple):
    """The NaN and infinite voxels of a NIfTI: their flat indices in the file's voxel order (x fastest: that of
    ``Volume.array.ravel()``) and their values."""
    indices: np.ndarray
    values: np.ndarray


def check_nifti(path: Path) -> NonFinite:
    """Refuse a single-file NIfTI-1 or NIfTI-2 (gzipped or not) that SimpleITK would read without complaint
    although it is broken: a header with a zero-length dimension (read as length 1), a gzip stream that
    ends early or fails its CRC, or less data than the header describes (vox_offset + voxels × bitpix / 8;
    the missing voxels would read as zeros). Other files (not NIfTI, or a .hdr/.img pair) are left to SimpleITK.
    A gzipped file, or a float one, is read once, in chunks, to its end.

    Returns:
        The NaN and infinite voxels of a float image (none for other files), which SimpleITK reads as 0.
    """
    none = NonFinite(np.zeros(0, np.int64), np.zeros(0))
    try:
        with path.open("rb") as raw:
            compressed = raw.read(2) == b"\x1f\x8b"
    except OSError as error:
        raise InputError(f"{path}: cannot be read ({error.strerror})") from None
    try:
        with (gzip.open(path, "rb") if compressed else path.open("rb")) as stream:
            head = stream.read(540)
            layout = _nifti_layout(head)
            if layout is None:
                return none
            if 0 in layout.shape:
                raise InputError(
                    f"{path}: the header gives size {' × '.join(map(str, layout.shape))}: the image has 0 slices (a "
                    "zero-length dimension), so there is nothing to segment. Export the image again."
                )
            if compressed or layout.float_type is not None:
                chunks = itertools.chain([head], iter(lambda: stream.read(CHUNK_BYTES), b""))
                size, non_finite = _scan(chunks, layout)
            else:
                size, non_finite = path.stat().st_size, none
    except (EOFError, OSError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise InputError(
            f"{path}: the file is truncated or corrupt ({error}). Copy or export it again."
        ) from None
    if size < layout.end:
        raise InputError(
            f"{path}: the file is truncated or corrupt: it holds {size} bytes of image but its header describes "
            f"{layout.end}. Copy or export it again."
        )
    return non_finite


def _scan(chunks: Iterable[bytes], layout: Layout) -> tuple[int, NonFinite]:
    """(the bytes in ``chunks``, the file from its start; its non-finite voxels when they are floats)."""
    size, skip, pending, start = 0, layout.offset, b"", 0
    count, dtype = math.prod(layout.shape), layout.float_type
    indices, values = [np.zeros(0, np.int64)], [np.zeros(0)]
    for chunk in chunks:
        size += len(chunk)
        dropped, skip = min(skip, len(chunk)), skip - min(skip, len(chunk))
        if dtype is None or start >= count:
            continue
        pending += chunk[dropped:]
        whole = len(pending) - len(pending) % dtype.itemsize
        voxels = np.frombuffer(pending[:whole], dtype)[:count - start]
        bad = np.flatnonzero(~np.isfinite(voxels))
        indices.append(bad + start)
        values.append(voxels[bad].astype(float))
        start, pending = start + len(voxels), pending[whole:]
    return size, NonFinite(np.concatenate(indices), np.concatenate(values))


def _nifti_layout(header: bytes) -> Optional[Layout]:
    """The `Layout` of a single-file NIfTI-1 or NIfTI-2 from its header; None when ``header`` is not one (another
    format, the .hdr of a .hdr/.img pair, or an invalid dimension count)."""
    for size, magic_at, magic, dim_format, dim_at, type_at, offset_format, offset_at in NIFTI_HEADERS:
        for order in "<>":
            if len(header) < size or header[magic_at:magic_at + 4] != magic:
                continue
            if struct.unpack_from(order + "i", header)[0] != size:
                continue
            dim = struct.unpack_from(order + dim_format, header, dim_at)
            datatype, bitpix = struct.unpack_from(order + "2h", header, type_at)
            (offset,) = struct.unpack_from(order + offset_format, header, offset_at)
            if not (1 <= dim[0] <= 7 and math.isfinite(offset)):
                return None
            shape = tuple(dim[1:dim[0] + 1])
            float_type = np.dtype(order + FLOAT_TYPES[datatype]) if datatype in FLOAT_TYPES else None
            return Layout(shape, int(offset), int(offset) + math.ceil(math.prod(shape) * bitpix / 8), float_type)
    return None
