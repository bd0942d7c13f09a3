"""Write masks as a DICOM Segmentation (SEG) object that references the DICOM series they were drawn on.

The SEG is built by highdicom from the headers of the source series' files (read with pydicom, without their
pixel data: JPEG-2000 or any other transfer syntax is fine). Frame ``k`` of each segment is the mask's slice
``k`` (``mask[k]``, rows × columns as the DICOM image's), which belongs to the series' file ``k`` in the order
`clisc.readers.read_volume` reads a series (GDCM's sort by position along the slice normal, via SimpleITK's
``ImageSeriesReader``); before writing, every file's position and orientation are checked against the volume's
geometry, so a frame can never land on another slice. Empty frames are omitted (highdicom's default); every
frame references its source instance and carries its plane position.

Each segment gets its name as the label, the prompt as its description, and SNOMED CT terminology codes chosen
from the prompt's words (`terminology`): category "Anatomical Structure" for an organ, "Morphologically Altered
Structure" for a lesion (with the organ as anatomic region), "Tissue" when no word is known, and a Left/Right
modifier for a paired organ. The codes are those of 3D Slicer's General Anatomy list, as CLISCSegment uses.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from .dicom_series import SLICE_POSITION_TOLERANCE_MM as POSITION_TOLERANCE_MM
from .dicom_series import choose_series
from .errors import EnvironmentProblem, InputError
from .volume import Volume

logger = logging.getLogger(__name__)

DICOM_SEG_SUFFIX = ".dcm"
SEG_FILE_NAME = "clisc_seg.dcm"  # the file `--dicom-seg DIR` writes in DIR

# SNOMED CT (scheme "SCT") codes: (value, meaning).
ANATOMICAL_STRUCTURE = ("123037004", "Anatomical Structure")
ALTERED_STRUCTURE = ("49755003", "Morphologically Altered Structure")
TISSUE = ("85756007", "Tissue")
ORGANS = {
    "brain": ("12738006", "Brain"), "liver": ("10200004", "Liver"), "lung": ("39607008", "Lung"),
    "kidney": ("64033007", "Kidney"), "spleen": ("78961009", "Spleen"), "heart": ("80891009", "Heart"),
    "pancreas": ("15776009", "Pancreas"), "prostate": ("41216001", "Prostate"), "stomach": ("69695003", "Stomach"),
    "aorta": ("15825003", "Aorta"), "breast": ("76752008", "Breast"),
}
PAIRED_ORGANS = ("lung", "kidney", "breast")
LESIONS = {
    "tumor": ("4147007", "Mass"), "tumour": ("4147007", "Mass"), "mass": ("4147007", "Mass"),
    "cancer": ("4147007", "Mass"), "lesion": ("4147007", "Mass"), "edema": ("79654002", "Edema"),
    "oedema": ("79654002", "Edema"), "necrosis": ("6574001", "Necrosis"), "cyst": ("367643001", "Cyst"),
    "hemorrhage": ("50960005", "Hemorrhage"),
}
SIDES = {"left": ("7771000", "Left"), "right": ("24028007", "Right")}


def terminology(prompt: str) -> dict:
    """SNOMED CT codes for a prompt: {"category", "type", "region" (or None), "modifier" (or None)}, each a
    (value, meaning) pair. "brain tumor" -> Morphologically Altered Structure / Mass, region Brain;
    "left kidney" -> Anatomical Structure / Kidney, modifier Left; an unknown prompt -> Tissue / Tissue."""
    words = [word[:-1] if word[:-1] in ORGANS or word[:-1] in LESIONS else word  # "lungs", "tumors"
             for word in re.findall(r"[a-z]+", prompt.lower())]
    organ = next((word for word in words if word in ORGANS), None)
    lesion = next((LESIONS[word] for word in words if word in LESIONS), None)
    side = next((SIDES[word] for word in words if word in SIDES), None) if organ in PAIRED_ORGANS else None
    if lesion:
        return {"category": ALTERED_STRUCTURE, "type": lesion, "region": ORGANS.get(organ), "modifier": None}
    if organ:
        return {"category": ANATOMICAL_STRUCTURE, "type": ORGANS[organ], "region": None, "modifier": side}
    return {"category": TISSUE, "type": TISSUE, "region": None, "modifier": None}


def require_highdicom():
    """(highdicom, pydicom); EnvironmentProblem with the pip command when highdicom is not installed (it is an
    optional dependency: ``pip install 'clisc[dicom]'``)."""
    try:
        import highdicom
        import pydicom
    except ImportError as error:
        raise EnvironmentProblem(f"writing a DICOM SEG needs highdicom ({error}): pip install 'highdicom>=0.23' "
                                 "(or pip install 'clisc[dicom]')") from None
    return highdicom, pydicom


def series_files(folder: str | Path, series_uid: Optional[str] = None) -> List[Path]:
    """The files of a DICOM series folder in the order `clisc.readers.read_volume` reads them (the same
    series, chosen by `clisc.dicom_series.choose_series`: ``series_uid`` (a UID or a file's name), else the one
    with the most files)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: a DICOM SEG references a DICOM series, so the input must be a DICOM series "
                         "folder; write a .seg.nrrd or a labelmap for other inputs")
    return [Path(name) for name in choose_series(folder, series_uid, warn=False)[1]]


def source_datasets(files: Sequence[Path]) -> list:
    """The files' headers (pydicom, no pixel data), with what anonymisation commonly empties filled in, in
    memory only: SOPClassUID and SOPInstanceUID from the file meta information (the same values), and an
    empty StudyInstanceUID or SeriesInstanceUID with one derived from the series' SOP instance UIDs (the same
    on every run; logged, since a viewer then links the SEG to its images by those instance UIDs and the
    frame of reference, not by study)."""
    _, pydicom = require_highdicom()
    from pydicom.uid import generate_uid

    datasets = [pydicom.dcmread(str(name), stop_before_pixels=True) for name in files]
    for dataset in datasets:
        meta = getattr(dataset, "file_meta", None)
        for attribute, meta_attribute in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                          ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not dataset.get(attribute) and meta is not None and meta.get(meta_attribute):
                setattr(dataset, attribute, meta.get(meta_attribute))
        if not dataset.get("SOPInstanceUID"):
            raise InputError(f"{dataset.filename}: the file has no SOP Instance UID, so a DICOM SEG cannot "
                             "reference it")
    instances = [str(d.SOPInstanceUID) for d in datasets]
    for attribute in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not all(d.get(attribute) for d in datasets):
            uid = generate_uid(entropy_srcs=[attribute] + instances)
            logger.warning("%s: the series' files have no %s (anonymised?); the DICOM SEG uses %s, derived from "
                           "their SOP instance UIDs", Path(files[0]).parent, attribute, uid)
            for dataset in datasets:
                setattr(dataset, attribute, uid)
    return datasets


def check_series_geometry(datasets: Sequence, volume: Volume) -> None:
    """InputError unless dataset ``k`` is slice ``k`` of ``volume``: its position (LPS mm) is the volume's
    voxel (0, 0, k) within `POSITION_TOLERANCE_MM`, its orientation the volume's i and j directions, and its
    rows × columns the volume's J × I."""
    count, rows, columns = volume.array.shape
    if len(datasets) != count:
        raise InputError(f"the DICOM series has {len(datasets)} files but the volume {count} slices: the SEG "
                         "must reference the series the volume was read from")
    ijk_to_lps = volume.ijk_to_lps
    directions = ijk_to_lps[:3, :2] / np.linalg.norm(ijk_to_lps[:3, :2], axis=0)
    for k, dataset in enumerate(datasets):
        position = ijk_to_lps @ np.array([0.0, 0.0, k, 1.0])
        found = np.asarray(dataset.ImagePositionPatient, dtype=float)
        orientation = np.asarray(dataset.ImageOrientationPatient, dtype=float).reshape(2, 3).T
        if (int(dataset.Rows), int(dataset.Columns)) != (rows, columns):
            raise InputError(f"{getattr(dataset, 'filename', 'a file')}: {dataset.Rows} × {dataset.Columns} pixels, "
                             f"the volume's slices {rows} × {columns}")
        if np.abs(found - position[:3]).max() > POSITION_TOLERANCE_MM or np.abs(orientation - directions).max() > 1e-4:
            raise InputError(f"{getattr(dataset, 'filename', 'a file')}: its position {found.tolist()} or orientation "
                             f"does not match slice {k} of the volume ({position[:3].round(3).tolist()}): the SEG "
                             "would misplace frames, so it is not written")


def write_dicom_seg(path: str | Path, masks: Sequence[np.ndarray], names: Sequence[str], volume: Volume,
                    series_folder: str | Path, series_uid: Optional[str] = None,
                    prompts: Optional[Sequence[str]] = None, description: str = "CLISC segmentation") -> Path:
    """Write ``masks`` ((K, J, I) bool each, on ``volume``'s grid) as one binary DICOM SEG at ``path``.

    Args:
        names: each segment's label (SegmentLabel, 64 characters at most).
        volume: the image read from ``series_folder`` (`clisc.readers.read_volume`); its geometry is checked
            against the series' files (`check_series_geometry`).
        series_uid: the series of the folder the volume was read from (default: the largest, as the reader).
        prompts: the text prompt of each segment (default: its name), stored as its SegmentDescription and as
            the algorithm's parameter.
    Written atomically (`clisc.writers.atomic_path`). Returns the path.
    """
    from . import __version__
    from .writers import atomic_path

    highdicom, pydicom = require_highdicom()
    from pydicom.sr.codedict import codes

    prompts = list(prompts) if prompts is not None else list(names)
    if not (len(masks) == len(names) == len(prompts)) or not masks:
        raise ValueError(f"{len(masks)} masks, {len(names)} names, {len(prompts)} prompts: give one of each, at least one")
    for mask in masks:
        if np.shape(mask) != volume.array.shape:
            raise InputError(f"a mask of shape {np.shape(mask)} is not on the volume's grid {volume.array.shape}")
    files = series_files(series_folder, series_uid)
    datasets = source_datasets(files)
    check_series_geometry(datasets, volume)

    def concept(code, scheme="SCT"):
        return highdicom.sr.CodedConcept(value=code[0], scheme_designator=scheme, meaning=code[1])

    descriptions = []
    for number, (name, prompt) in enumerate(zip(names, prompts), start=1):
        terms = terminology(prompt)
        algorithm = highdicom.AlgorithmIdentificationSequence(
            name="CLISC", family=codes.cid7162.ArtificialIntelligence, version=__version__,
            parameters={"prompt": prompt})
        segment = highdicom.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64], segmented_property_category=concept(terms["category"]),
            segmented_property_type=concept(terms["type"]), algorithm_type="AUTOMATIC",
            algorithm_identification=algorithm, tracking_uid=highdicom.UID(), tracking_id=name[:64],
            anatomic_regions=[concept(terms["region"])] if terms["region"] else None)
        if terms["modifier"]:
            segment.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                concept(terms["modifier"])]
        segment.SegmentDescription = prompt[:64]
        descriptions.append(segment)
    pixels = np.stack([np.asarray(mask, dtype=bool) for mask in masks], axis=-1).astype(np.uint8)  # (K, J, I, S)
    seg = highdicom.seg.Segmentation(
        source_images=datasets, pixel_array=pixels, segmentation_type="BINARY", segment_descriptions=descriptions,
        series_instance_uid=highdicom.UID(), series_number=int(getattr(datasets[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=highdicom.UID(), instance_number=1, manufacturer="CLISC", manufacturer_model_name="CLISC",
        software_versions=__version__, device_serial_number="0", series_description=description[:64],
        content_label="CLISC", content_description=description[:64],
        omit_empty_frames=bool(pixels.any()))  # all empty: every frame is kept (a SEG needs one)
    with atomic_path(path) as temporary:
        seg.save_as(str(temporary))
    return Path(path)
