"""`Volume`: a voxel array with the geometry that places it in patient space.

It imports numpy only (no torch): a remote client maps clicks to slices with `slice_axis` and `slice_point`.

Conventions (the same as 3D Slicer's):
- ``array`` is indexed ``[k, j, i]`` (slowest to fastest), as ``slicer.util.arrayFromVolume`` returns it.
- ``ijk_to_ras`` is the 4×4 matrix from voxel index (i, j, k, 1) to patient RAS millimetres.
  Files (ITK, NIfTI via SimpleITK, DICOM) store LPS; the conversion is a sign flip of x and y.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
AXIS_NAMES = {"k": 0, "j": 1, "i": 2}
ANATOMICAL_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # the RAS axis each plane is normal to


@dataclass
class Volume:
    """A 3D image: ``array`` (K, J, I) and ``ijk_to_ras`` (4, 4); ``source`` says where it came from."""

    array: np.ndarray
    ijk_to_ras: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=float)
        if self.array.ndim != 3:
            raise ValueError(f"Volume array must be 3D (K, J, I), got shape {self.array.shape}")
        if self.ijk_to_ras.shape != (4, 4):
            raise ValueError(f"ijk_to_ras must be 4x4, got {self.ijk_to_ras.shape}")

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along i, j, k in millimetres."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def ijk_to_lps(self) -> np.ndarray:
        return LPS_TO_RAS @ self.ijk_to_ras

    def with_array(self, array: np.ndarray) -> "Volume":
        """A volume on the same voxel grid holding ``array`` (same (K, J, I) shape)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the volume's {self.array.shape}")
        return Volume(array, self.ijk_to_ras.copy(), self.source)

    def acquisition_axis(self) -> int:
        """The array axis (0=k, 1=j, 2=i) along which the image was most likely acquired as slices.

        A one-voxel-thick axis if there is one (a 2D image); else the axis with the largest spacing (thick
        slices); on ties, k, the file's slice axis.
        """
        if 1 in self.array.shape:
            return self.array.shape.index(1)
        spacing_kji = self.spacing[::-1]
        return int(np.flatnonzero(np.isclose(spacing_kji, spacing_kji.max(), rtol=1e-3))[0])

    @classmethod
    def from_sitk(cls, image, source: str = "") -> "Volume":
        """Volume from a 2D or 3D scalar SimpleITK image (a 2D image becomes one slice)."""
        import SimpleITK as sitk

        array = sitk.GetArrayFromImage(image)
        dim = image.GetDimension()
        direction = np.eye(3)
        direction[:dim, :dim] = np.reshape(image.GetDirection(), (dim, dim))
        spacing = np.ones(3)
        spacing[:dim] = image.GetSpacing()
        origin = np.zeros(3)
        origin[:dim] = image.GetOrigin()
        ijk_to_lps = np.eye(4)
        ijk_to_lps[:3, :3] = direction @ np.diag(spacing)
        ijk_to_lps[:3, 3] = origin
        if dim == 2:
            array = array[np.newaxis]
        return cls(array, LPS_TO_RAS @ ijk_to_lps, source)

    def to_sitk(self, array: np.ndarray | None = None):
        """SimpleITK image of ``array`` (default: this volume's) on this volume's grid, in LPS."""
        import SimpleITK as sitk

        array = self.array if array is None else array
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the volume's {self.array.shape}")
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        ijk_to_lps = self.ijk_to_lps
        spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
        image.SetSpacing(spacing.tolist())
        image.SetDirection((ijk_to_lps[:3, :3] / spacing).ravel().tolist())
        image.SetOrigin(ijk_to_lps[:3, 3].tolist())
        return image


def slice_axis(volume: Volume, axis: str) -> int:
    """Array axis (0=k, 1=j, 2=i) to slice along: an index letter, an anatomical plane, or auto."""
    if axis == "auto":
        return volume.acquisition_axis()
    if axis in AXIS_NAMES:
        return AXIS_NAMES[axis]
    if axis in ANATOMICAL_AXES:
        # the index axis (i, j, k) whose direction is closest to the plane's normal, as an array axis
        directions = np.abs(volume.ijk_to_ras[:3, :3] / volume.spacing)
        return 2 - int(np.argmax(directions[ANATOMICAL_AXES[axis]]))
    raise InputError(f"unknown axis {axis!r}; use auto, axial, coronal, sagittal, k, j or i")


def slice_point(volume: Volume, ras: Sequence[float], axis: int) -> tuple:
    """(slice index, (x, y)) of a RAS position (mm) along ``axis``: the nearest voxel's indices. For axis 0
    (k) that is (k, (i, j)). InputError when the position is outside the volume."""
    ijk = (np.linalg.inv(volume.ijk_to_ras) @ np.r_[np.asarray(ras, dtype=float), 1.0])[:3]
    i, j, k = (int(v) for v in np.floor(ijk + 0.5))
    size_i, size_j, size_k = volume.array.shape[::-1]
    if not (0 <= i < size_i and 0 <= j < size_j and 0 <= k < size_k):
        raise InputError(f"the point at RAS {np.round(ras, 2).tolist()} mm is voxel (i, j, k) = ({i}, {j}, {k}), "
                         f"outside the volume ({size_i} × {size_j} × {size_k} voxels): place it on the image")
    kji = (k, j, i)
    row_col = [kji[a] for a in range(3) if a != axis]
    return kji[axis], (row_col[1], row_col[0])
