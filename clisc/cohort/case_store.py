"""Pre-processed cases on disk, read lazily: a run never holds its cohort in memory.

Each case is read and pre-processed once (`cases.preprocess`), and stored in the run folder as
``preprocessed/CASE/{image,body}.npy`` with ``case.json`` (its crop and the input's grid), written last, so
that a case is stored when its ``case.json`` is there. Arrays open memory-mapped: a stage touches one case
at a time, and U-Net patches read only the pages they cut. Disk: 5 bytes per voxel of the body's bounding
box (a BraTS volume: about 13 MB).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..readers import read_volume
from ..volume import Volume
from ..writers import atomic_path, write_bytes
from .cases import Case, body_mask, preprocess, to_truncated_uint8_slices, to_uint8_slices

CASE_FILE = "case.json"
MIN_SLICES = 3  # on fewer axial slices the CAM's 3×3×3 opening erases every voxel: nothing can be learnt


@dataclass
class StoredCase:
    """A pre-processed case in ``folder``: the image (K', J', I') float32 is the input's ``crop``, z-scored;
    ``body`` its body voxels; ``shape``/``ijk_to_ras`` the input's grid (for writing results on it)."""

    case: Case
    folder: Path
    crop: tuple
    shape: tuple
    ijk_to_ras: np.ndarray

    @property
    def case_id(self) -> str:
        return self.case.case_id

    @property
    def image(self) -> np.ndarray:
        """(K', J', I') float32, memory-mapped read-only."""
        return np.load(self.folder / "image.npy", mmap_mode="r")

    @property
    def body(self) -> np.ndarray:
        """(K', J', I') bool, memory-mapped read-only."""
        return np.load(self.folder / "body.npy", mmap_mode="r")

    def slices(self) -> np.ndarray:
        """(K', J', I') uint8: each axial slice of the image min-max scaled, as the 2D models see it."""
        return to_uint8_slices(np.asarray(self.image))

    def classifier_slices(self) -> np.ndarray:
        """(K', J', I') uint8: each axial slice min-max scaled and truncated, as the slice classifier sees it."""
        return to_truncated_uint8_slices(np.asarray(self.image))

    def reference(self) -> Volume:
        """A volume on the input's grid, for writers."""
        return Volume(np.zeros(self.shape, np.uint8), self.ijk_to_ras, str(self.case.path))


def store_case(case: Case, folder: Path) -> StoredCase:
    """Read and pre-process ``case`` into ``folder`` (created); InputError as `read_volume`/`preprocess` raise,
    and for a body on fewer than `MIN_SLICES` axial slices."""
    volume = read_volume(case.path)
    image, crop = preprocess(volume)
    if len(image) < MIN_SLICES:
        raise InputError(f"{case.path}: its body lies on {len(image)} axial slice(s); the cohort's 3D steps (the "
                         f"CAM's 3×3×3 opening, the 3D U-Net) need at least {MIN_SLICES}. A single image is "
                         "segmented with `clisc segment`.")
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in (("image", image), ("body", body_mask(volume.array)[crop])):
        with atomic_path(folder / f"{name}.npy") as temporary:
            np.save(temporary, array)
    meta = {"path": str(case.path), "crop": [[s.start, s.stop] for s in crop], "shape": list(volume.array.shape),
            "ijk_to_ras": volume.ijk_to_ras.tolist()}
    write_bytes(folder / CASE_FILE, json.dumps(meta).encode())
    return open_case(case, folder)


def open_case(case: Case, folder: Path) -> StoredCase:
    """The case stored in ``folder`` by `store_case`."""
    meta = json.loads((folder / CASE_FILE).read_text())
    crop = tuple(slice(start, stop) for start, stop in meta["crop"])
    return StoredCase(case, folder, crop, tuple(meta["shape"]), np.array(meta["ijk_to_ras"]))


def is_stored(folder: Path) -> bool:
    return (folder / CASE_FILE).is_file()


class SliceFile:
    """(N, S, S) uint8 slices in a raw file, indexed like an array: each read maps the file, copies the rows
    asked for and unmaps it, so the slices never have to fit in memory."""

    def __init__(self, path: Path, count: int, size: int) -> None:
        self.path, self.shape = path, (count, size, size)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        return np.array(np.memmap(self.path, np.uint8, "r", shape=self.shape)[rows])


class TrainingPairs(Sequence):
    """(image, label) of each case for U-Net training, read when a patch is cut from it: the stored image and a
    label (K', J', I') bool saved as .npy on the same grid, both memory-mapped."""

    def __init__(self, items: list[StoredCase], labels: list[Path]) -> None:
        self.items, self.labels = items, labels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.items[n].image, np.load(self.labels[n], mmap_mode="r")
