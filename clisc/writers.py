"""Write masks and volumes on the grid of a reference `Volume`: labelmaps, Slicer `.seg.nrrd`, float maps.

Every writer writes to a temporary file beside the target, checks that the write was complete, and only then
renames it into place, so a failure (a full disk) or a cancellation never leaves a half-written file under
the final name, and never replaces an existing file with one. A failed write raises `WriteError`.
"""
from __future__ import annotations

import errno
import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from .errors import InputError, WriteError
from .nifti import check_nifti
from .readers import VOLUME_SUFFIXES
from .volume import Volume

SEGMENTATION_SUFFIX = ".seg.nrrd"

# Distinct colours for segments, in order (Slicer's GenericAnatomyColors-like palette, RGB 0..1).
SEGMENT_COLORS = (
    (0.90, 0.30, 0.24), (0.27, 0.60, 0.86), (0.40, 0.76, 0.35), (0.95, 0.77, 0.06), (0.61, 0.35, 0.71),
    (0.10, 0.74, 0.61), (0.90, 0.49, 0.13), (0.93, 0.44, 0.71), (0.55, 0.55, 0.55), (0.20, 0.29, 0.37),
)


def output_kind(path: str | Path) -> str:
    """"segmentation" for .seg.nrrd, "labelmap" for the labelmap suffixes; InputError otherwise."""
    name = str(path).lower()
    if name.endswith(SEGMENTATION_SUFFIX):
        return "segmentation"
    if name.endswith(VOLUME_SUFFIXES):
        return "labelmap"
    raise InputError(
        f"{path}: unsupported output type; use {SEGMENTATION_SUFFIX} (Slicer segmentation) or a labelmap "
        f"({', '.join(VOLUME_SUFFIXES)})"
    )


PARTIAL_MARK = ".partial"  # in the names of files being written; `remove_partial_files` finds them by it


FULL_DISK_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def write_failed(path: str | Path, reason: str, full: bool = True) -> WriteError:
    """The error for a write of ``path`` that failed for ``reason``; ``full``: it may be a full disk."""
    hint = "; the disk may be full, or a quota or file-size limit reached: free some space and run again"
    return WriteError(f"{path}: could not be written ({reason}){hint if full else ''}.")


@contextmanager
def reporting_write_errors(path: str | Path) -> Iterator[None]:
    """Turn an OSError raised while writing ``path`` into `write_failed`'s `WriteError`."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error)
        raise write_failed(path, reason, full=error.errno in FULL_DISK_ERRORS or error.errno is None) from error


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (hidden, marked partial, ending with the same suffix so that
    writers choose the same format); move it onto ``path`` on success, remove it on failure (nothing is ever
    left under the final name, and a file there is kept). An OSError (a write past a full disk) becomes a
    `WriteError` naming ``path``; a writer that reports failures otherwise raises `write_failed` itself.

    Permissions: a new file gets 0666 minus the umask, as any file ``open`` creates; a file that replaces an
    existing one keeps that file's mode (as ``cp`` onto an existing file does).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"{path}: the folder {path.parent} does not exist")
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith((".nii.gz", ".seg.nrrd")) else path.suffix
    try:
        with reporting_write_errors(path):
            temporary = _create_partial(path, suffix)
            try:
                yield temporary
                _keep_mode(temporary, path)
                os.replace(temporary, path)
            finally:
                temporary.unlink(missing_ok=True)
    except WriteError as error:
        raise WriteError(f"{error} Nothing was written under that name (a file there is kept as it was).") from error


def _create_partial(path: Path, suffix: str) -> Path:
    """Create a new empty file ``.NAME.RANDOM.partialSUFFIX`` beside ``path``, with mode 0666 minus the umask
    (unlike tempfile.mkstemp's 0600)."""
    while True:
        temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}{PARTIAL_MARK}{suffix}"
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temporary
        except FileExistsError:
            continue


def _keep_mode(temporary: Path, path: Path) -> None:
    """Give ``temporary``, about to replace ``path``, the permission bits of ``path`` if it exists."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    os.chmod(temporary, mode)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see `atomic_path`)."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def remove_partial_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files a killed writer left under ``folder`` (recursively); returns them."""
    found = [path for path in Path(folder).rglob(f".*{PARTIAL_MARK}*") if path.is_file()]
    for path in found:
        path.unlink()
    return found


def write_volume(path: str | Path, reference: Volume, array: Optional[np.ndarray] = None) -> None:
    """Write ``array`` (K, J, I) (default: the reference's own) on the reference's grid (NIfTI/NRRD/MHA/MHD;
    a .mhd header gets its voxels beside it in NAME.zraw, see `_write_mhd`). `WriteError` when the file could
    not be written whole (`_write_image`)."""
    image = reference.to_sitk(array)
    with atomic_path(path) as temporary:
        if temporary.suffix.lower() == ".mhd":
            _write_mhd(image, temporary, Path(path))
        else:
            _write_image(image, temporary, Path(path))


def _write_image(image, temporary: Path, final: Path) -> None:
    """``sitk.WriteImage`` to ``temporary``, then read it back: `write_failed` unless it holds ``image``.

    ITK's NIfTI writer reports a short write (a full disk) only on stderr, and its reader fills what is missing
    with zeros, so a NIfTI is first checked against the size its header describes (`check_nifti`); the other
    writers raise, and any file is read back and compared voxel for voxel. The file is flushed to disk first
    (``fsync``), where a network file system reports what it could not store."""
    import SimpleITK as sitk

    try:
        sitk.WriteImage(image, str(temporary), useCompression=True)
        _sync(temporary)
        if temporary.name.lower().endswith((".nii", ".nii.gz")):
            check_nifti(temporary)
        written = sitk.ReadImage(str(temporary))
    except RuntimeError as error:  # ITK's writers and readers
        raise write_failed(final, str(error).strip().splitlines()[-1].removeprefix("Reason: ")) from None
    except InputError:  # from check_nifti
        raise write_failed(final, "the file written is cut short") from None
    voxels, expected = sitk.GetArrayViewFromImage(written), sitk.GetArrayViewFromImage(image)
    if not np.array_equal(voxels, expected, equal_nan=np.issubdtype(expected.dtype, np.floating)):
        raise write_failed(final, "the file read back differs from what was written")


def _sync(path: Path) -> None:
    """``fsync`` the file at ``path`` (opened for writing: Windows' fsync needs it)."""
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_mhd(image, header: Path, final: Path) -> None:
    """Write a MetaImage ``header`` (the temporary name of ``final``) with its compressed voxels in FINAL.zraw.

    SimpleITK names the data file after the header it writes (the temporary one), so the data file is checked
    (`_write_image`), then moved to the final name, keeping the mode of a file it replaces, and the header's
    ElementDataFile is rewritten to match, before the header itself is moved into place. The temporary data
    file is removed on failure.
    """
    data, final_data = header.with_suffix(".zraw"), final.with_suffix(".zraw")
    try:
        _write_image(image, header, final)
        _sync(data)
        text, line = header.read_bytes(), f"ElementDataFile = {data.name}\n".encode()
        if line not in text:
            raise RuntimeError(f"{header}: SimpleITK did not write its data to {data.name}")
        header.write_bytes(text.replace(line, f"ElementDataFile = {final_data.name}\n".encode()))
        _keep_mode(data, final_data)
        os.replace(data, final_data)
    finally:
        data.unlink(missing_ok=True)


def write_labelmap(path: str | Path, labels: np.ndarray, reference: Volume) -> None:
    """Write an integer labelmap (K, J, I) on the reference's grid; 0 is background."""
    labels = np.asarray(labels)
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    write_volume(path, reference, labels.astype(dtype))


def write_segmentation(
    path: str | Path,
    masks: Sequence[np.ndarray],
    names: Sequence[str],
    reference: Volume,
    colors: Optional[Sequence[Sequence[float]]] = None,
    tags: Optional[Sequence[dict]] = None,
) -> None:
    """Write a Slicer segmentation (.seg.nrrd): one segment per mask, with name, colour and tags.

    Args:
        masks: boolean arrays (K, J, I) on the reference grid, one per segment; they may overlap
            (overlapping segments go to separate layers, as Slicer stores them).
        names: one segment name per mask.
        colors: RGB in 0..1 per mask (default: `SEGMENT_COLORS` in order).
        tags: optional dict of string tags per segment (stored as Slicer segment tags).

    Non-ASCII names and tags are written as UTF-8 bytes in the NRRD header, as 3D Slicer writes them (its
    strings are UTF-8 and its NRRD writer, teem, copies the bytes) and reads them back (ITK's NRRD reader,
    as SimpleITK's). pynrrd, which slicerio uses, writes ASCII only, so they go through it as ASCII stand-ins
    (see `_restore_utf8`). pynrrd 1.1 also reads headers as ASCII and drops the other bytes, so
    ``slicerio.read_segmentation`` returns such names without their non-ASCII characters:
    `clisc.readers.read_segmentation` returns them exactly.
    """
    import slicerio

    if len(masks) != len(names):
        raise ValueError(f"{len(masks)} masks but {len(names)} names")
    utf8: dict[str, str] = {}  # ASCII stand-in -> the non-ASCII text it stands for

    def ascii_text(text: str) -> str:
        if text.isascii():
            return text
        stand_in = f"clisc-utf8-{secrets.token_hex(16)}"
        utf8[stand_in] = text
        return stand_in

    segmentation = slicerio.create_segmentation(reference.array.shape[::-1], reference.ijk_to_lps)
    for index, (mask, name) in enumerate(zip(masks, names)):
        segment = {
            "id": f"Segment_{index + 1}",
            "name": ascii_text(name),
            "color": list(colors[index] if colors else SEGMENT_COLORS[index % len(SEGMENT_COLORS)]),
        }
        if tags:
            segment["tags"] = {ascii_text(key): ascii_text(value) for key, value in tags[index].items()}
        slicerio.add_segment(segmentation, np.asarray(mask, dtype=bool).transpose(2, 1, 0), segment)
    with atomic_path(path) as temporary:
        slicerio.write_segmentation(str(temporary), segmentation)
        if utf8:
            _restore_utf8(temporary, utf8)


def _restore_utf8(path: Path, utf8: dict[str, str]) -> None:
    """Replace each ASCII stand-in in the NRRD header of ``path`` (up to its first blank line) by the UTF-8
    bytes of the text it stands for; the data after the header is kept as is."""
    content = path.read_bytes()
    end = content.index(b"\n\n") + 2
    header = content[:end]
    for stand_in, text in utf8.items():
        header = header.replace(stand_in.encode(), text.encode("utf-8"))
    path.write_bytes(header + content[end:])


def write_masks(path: str | Path, masks: Sequence[np.ndarray], names: Sequence[str], reference: Volume) -> None:
    """Write masks as a `.seg.nrrd` segmentation or, by the suffix, as a labelmap (label n = mask n, 1-based;
    where masks overlap, the later one wins in a labelmap)."""
    if output_kind(path) == "segmentation":
        write_segmentation(path, masks, names, reference)
        return
    labels = np.zeros(reference.array.shape, dtype=np.uint16)
    for value, mask in enumerate(masks, start=1):
        labels[np.asarray(mask, dtype=bool)] = value
    write_labelmap(path, labels, reference)
