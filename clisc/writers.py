"""Write masks and volumes on the grid of a reference `Volume`: labelmaps, Slicer `.seg.nrrd`, float maps.

Every writer writes to a temporary file beside the target and renames it into place, so a failure or a
cancellation never leaves a half-written file under the final name.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from .errors import InputError
from .volume import Volume

LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
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
    if name.endswith(LABELMAP_SUFFIXES):
        return "labelmap"
    raise InputError(
        f"{path}: unsupported output type; use {SEGMENTATION_SUFFIX} (Slicer segmentation) or a labelmap "
        f"({', '.join(LABELMAP_SUFFIXES)})"
    )


PARTIAL_MARK = ".partial"  # in the names of files being written; `remove_partial_files` finds them by it


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (hidden, marked partial, ending with the same suffix so that
    writers choose the same format); move it onto ``path`` on success, remove it on failure."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"{path}: the folder {path.parent} does not exist")
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith((".nii.gz", ".seg.nrrd")) else path.suffix
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_MARK + suffix, dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


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
    """Write ``array`` (K, J, I) (default: the reference's own) on the reference's grid (NIfTI/NRRD/MHA)."""
    import SimpleITK as sitk

    image = reference.to_sitk(array)
    with atomic_path(path) as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=True)


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
    """
    import slicerio

    if len(masks) != len(names):
        raise ValueError(f"{len(masks)} masks but {len(names)} names")
    segmentation = slicerio.create_segmentation(reference.array.shape[::-1], reference.ijk_to_lps)
    for index, (mask, name) in enumerate(zip(masks, names)):
        segment = {
            "id": f"Segment_{index + 1}",
            "name": name,
            "color": list(colors[index] if colors else SEGMENT_COLORS[index % len(SEGMENT_COLORS)]),
        }
        if tags:
            segment["tags"] = dict(tags[index])
        slicerio.add_segment(segmentation, np.asarray(mask, dtype=bool).transpose(2, 1, 0), segment)
    with atomic_path(path) as temporary:
        slicerio.write_segmentation(str(temporary), segmentation)


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
