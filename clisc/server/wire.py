"""What travels between `clisc serve` and its clients: arrays as gzip NRRD, the API version, the version message.

Every array on the wire is an NRRD file (gzip), written by pynrrd: a volume (K, J, I) with its IJK→RAS (``space
right-anterior-superior``, ``space directions`` and ``space origin``), a stack of masks (N, K, J, I) uint8 on
that grid, or a mask slice (rows, columns). Reading is strict, because the bytes come from the network: one
attached gzip or raw data block only (a ``data file`` field would make the server open a path named by the
client), a known scalar type, every size at least 1, and exactly the bytes the header's sizes call for (decompressed
with a bound, so a small upload cannot inflate past its header's size). Each refusal is an InputError saying what
was wrong.

This module needs numpy and pynrrd only: the Slicer client (CLISCLib.remote) imports it without torch.
"""
from __future__ import annotations

import base64
import io
import zlib
from typing import BinaryIO, Optional, Tuple, Union

import numpy as np

from ..errors import InputError

API_VERSION = 1  # raised when a request or an answer changes shape; both sides state theirs on every exchange
API_HEADER = "X-CLISC-API"  # the API version a request speaks
CLISC_HEADER = "X-CLISC-Version"  # the clisc version of the side that sent it
NRRD_MEDIA_TYPE = "application/x-nrrd"
COMPRESSION_LEVEL = 1  # masks and medical images gzip nearly as small at 1 as at 9, several times faster
# NRRD type names (the spec's aliases that pynrrd, ITK and Slicer write) -> numpy
NRRD_TYPES = {
    **dict.fromkeys(("int8", "signed char", "int8_t"), "i1"),
    **dict.fromkeys(("uint8", "uchar", "unsigned char", "uint8_t"), "u1"),
    **dict.fromkeys(("int16", "short", "short int", "signed short", "int16_t"), "i2"),
    **dict.fromkeys(("uint16", "ushort", "unsigned short", "uint16_t"), "u2"),
    **dict.fromkeys(("int32", "int", "signed int", "int32_t"), "i4"),
    **dict.fromkeys(("uint32", "uint", "unsigned int", "uint32_t"), "u4"),
    "float": "f4", "double": "f8",
}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def encode_array(array: np.ndarray, ijk_to_ras: Optional[np.ndarray] = None) -> bytes:
    """A gzip NRRD file of ``array``: (K, J, I) or a stack (N, K, J, I) on the grid ``ijk_to_ras`` (4, 4), or any
    array without a grid (a mask slice). bool is sent as uint8."""
    import nrrd

    array = np.ascontiguousarray(array.astype(np.uint8) if array.dtype == bool else array)
    header = {"encoding": "gzip", "endian": "little"}
    if ijk_to_ras is not None:
        matrix = np.asarray(ijk_to_ras, dtype=float)
        stacked = array.ndim == 4
        directions = matrix[:3, :3].T  # one row per NRRD axis, fastest first: i, j, k
        header.update({"space": "right-anterior-superior", "space origin": matrix[:3, 3],
                       "space directions": np.vstack([directions, np.full(3, np.nan)]) if stacked else directions,
                       "kinds": ["domain"] * 3 + (["list"] if stacked else [])})
    buffer = io.BytesIO()
    nrrd.write(buffer, array.astype(array.dtype.newbyteorder("<"), copy=False), header,
               compression_level=COMPRESSION_LEVEL, index_order="C")
    return buffer.getvalue()


def decode_array(source: Union[bytes, BinaryIO], max_bytes: int, grid: bool = True
                 ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(array in C order: (K, J, I), (N, K, J, I) or as sent, IJK→RAS (4, 4) or None) of an NRRD file sent by
    `encode_array` or any NRRD writer (Slicer, ITK). ``max_bytes``: the most its voxels may take once
    decompressed. ``grid``: the array must be 3D (or a 4D stack) with its geometry. InputError for anything
    else."""
    import nrrd

    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        header = nrrd.read_header(_HeaderLines(stream))
    except (nrrd.NRRDError, StopIteration, ValueError, TypeError, UnicodeDecodeError) as error:
        raise InputError(f"the upload is not an NRRD file ({str(error)[:200] or 'empty'}): send the volume as "
                         "NRRD (gzip) with its IJK→RAS") from None
    if {"data file", "datafile"} & set(header):
        raise InputError("the NRRD names a separate data file: send the voxels inside the file (attached data)")
    if header.get("encoding") not in ("gzip", "gz", "raw"):
        raise InputError(f"NRRD encoding {header.get('encoding')!r}: send gzip (or raw)")
    if str(header.get("type")) not in NRRD_TYPES:
        raise InputError(f"NRRD type {header.get('type')!r}: send one of int8, uint8, int16, uint16, int32, "
                         "uint32, float or double")
    sizes = [int(s) for s in np.atleast_1d(header.get("sizes", []))]
    if not sizes or min(sizes) < 1:
        raise InputError(f"the volume's sizes are {sizes}: an empty volume cannot be segmented")
    endian = ">" if header.get("endian") == "big" else "<"
    dtype = np.dtype(endian + NRRD_TYPES[str(header["type"])])
    expected = int(np.prod(sizes)) * dtype.itemsize
    if expected > max_bytes:
        raise InputError(f"the volume's header says {' × '.join(map(str, sizes))} voxels of {dtype.name} "
                         f"({expected / 2 ** 20:.0f} MiB), more than this server takes ({max_bytes / 2 ** 20:.0f} MiB)")
    data = stream.read()
    if header["encoding"] != "raw":
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
        try:
            data = inflater.decompress(data, expected + 1)
        except zlib.error as error:
            raise InputError(f"the volume's gzip data is damaged ({error}): send it again") from None
    if len(data) != expected:
        raise InputError(f"the volume's data holds {len(data)} bytes once decompressed, but its header "
                         f"({' × '.join(map(str, sizes))} {dtype.name}) calls for {expected}: the upload was cut "
                         "short or the header is wrong")
    array = np.frombuffer(data, dtype).reshape(sizes[::-1]).astype(dtype.newbyteorder("="))
    return (array, _ijk_to_ras(header, len(sizes))) if grid else (array, None)


def _ijk_to_ras(header: dict, dimension: int) -> np.ndarray:
    if dimension not in (3, 4):
        raise InputError(f"a {dimension}D NRRD: send a 3D scalar volume")
    directions = header.get("space directions")
    origin = header.get("space origin")
    space = header.get("space", "")
    if directions is None or origin is None or space not in ("right-anterior-superior", "RAS",
                                                              "left-posterior-superior", "LPS"):
        raise InputError("the NRRD has no RAS or LPS space with space directions and origin: send the volume with "
                         "its IJK→RAS, or the mask would not land on its voxels")
    rows = np.asarray([row for row in directions if row is not None and not np.isnan(row).any()], dtype=float)
    if rows.shape != (3, 3) or abs(np.linalg.det(rows)) < 1e-12:
        raise InputError(f"the NRRD's space directions {np.asarray(directions).tolist()} are not three independent "
                         "directions of i, j and k")
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = rows.T, np.asarray(origin, dtype=float)
    if space in ("left-posterior-superior", "LPS"):
        matrix[:3] = LPS_TO_RAS @ matrix[:3]
    return matrix


class _HeaderLines:
    """The lines of an NRRD header from a binary stream, stopping at the blank line, so that the stream is left at
    the first byte of the data (pynrrd reads the header from any iterator of lines)."""

    MAX_LINES = 200

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.count = stream, 0

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        line = self.stream.readline(4096)
        self.count += 1
        if not line or line in (b"\n", b"\r\n") or self.count > self.MAX_LINES:
            raise StopIteration
        return line


def to_text(array: np.ndarray, ijk_to_ras: Optional[np.ndarray] = None) -> str:
    """`encode_array` as base64 text, for an array inside a JSON request or answer (a mask: a few kB)."""
    return base64.b64encode(encode_array(array, ijk_to_ras)).decode("ascii")


def from_text(text: str, max_bytes: int, grid: bool = True) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """`decode_array` of `to_text`'s text."""
    try:
        data = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise InputError("an array in the request is not base64 text of an NRRD file") from None
    return decode_array(data, max_bytes, grid)


def version_mismatch(client_api: int, client_version: str, server_api: int, server_version: str) -> str:
    """The one message for client and server speaking different API versions: both versions, and what to
    upgrade."""
    if int(client_api) < int(server_api):
        fix = ("update the CLISC extension (Slicer: View > Extensions Manager > Check for updates), or `pip install "
               f"'clisc=={server_version}'` for a Python client")
    else:
        fix = f"update clisc on the server to {client_version} or newer (`pip install -U 'clisc[server]'`) and restart it"
    return (f"CLISC version mismatch: this client is clisc {client_version} (API {client_api}), the server is clisc "
            f"{server_version} (API {server_api}); {fix}.")
