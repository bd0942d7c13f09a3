"""Shared fixtures: the real data beside the project (skipped when absent) and small synthetic images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(relative: str) -> Path:
    """Path under ../shared/data, or skip the test (with the reason) when it is not there."""
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"real test data {path} is absent (it sits beside the project as ../shared/data)")
    return path


def save_abnormal_classifier(path: Path) -> Path:
    """A random ResNet-50 slice classifier (a classifier checkpoint, head included) whose head is biased towards
    "abnormal": trained for an epoch or two it still calls every slice abnormal, so the cohort's real gate
    (probability > 0.5) passes the slices on to LayerCAM, AMDA and SAM. A plain random classifier passes
    almost none, which leaves SAM and the U-Net nothing to learn."""
    import torch

    from clisc.cohort.classifier import build_classifier

    model = build_classifier(seed=0)
    with torch.no_grad():
        model.fc[-1].bias.copy_(torch.tensor([-4.0, 4.0]))
    torch.save(model.state_dict(), path)
    return path


def oblique_ijk_to_ras(degrees=30.0, spacing=(0.9, 1.1, 2.5), flip=(1, 1, 1)) -> np.ndarray:
    """IJK→RAS rotated about R then S by ``degrees``, with the given spacing and axis flips."""
    a = np.radians(degrees)
    about_r = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    about_s = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = about_s @ about_r @ np.diag(np.multiply(spacing, flip))
    matrix[:3, 3] = (-40.0, 25.5, 60.0)
    return matrix


def slicer_module(name: str):
    """Our Slicer module file ``name`` ("CLISCSegment"), or a module of the CLISCLib package they share
    ("CLISCLib.jobs"), on headless MRML (see slicer_stubs); skips when slicer-core is absent."""
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core (the MRML layer) is not installed; `pip install slicer-core vtk==9.6.2`")
    import slicer_stubs

    return slicer_stubs.import_module(name)


@pytest.fixture(scope="module")
def jobs():
    """CLISCLib.jobs: the background jobs both Slicer modules run the engine in."""
    return slicer_module("CLISCLib.jobs")


@pytest.fixture(scope="module")
def mrml():
    """CLISCLib.mrml: the MRML adapter both Slicer modules read volumes and write results with."""
    return slicer_module("CLISCLib.mrml")


@pytest.fixture(scope="module")
def dependencies():
    """CLISCLib.dependencies: the first-run package installation both Slicer modules go through."""
    return slicer_module("CLISCLib.dependencies")


@pytest.fixture(scope="module")
def terminology():
    """CLISCLib.terminology: the terminology table of the segments."""
    return slicer_module("CLISCLib.terminology")


@pytest.fixture
def scene(module):
    """The headless MRML scene, emptied; ``module`` is the test file's fixture importing its Slicer module
    (which starts MRML)."""
    import slicer

    slicer.mrmlScene.Clear()
    return slicer.mrmlScene


@pytest.fixture(autouse=True)
def torch_runtime_for_auto(monkeypatch):
    """``runtime="auto"`` (the default) means PyTorch in tests: with OpenVINO installed every test with a fresh
    cache would otherwise export its tiny CLIP first. Testing/test_runtimes.py tests the runtimes by name and
    the real "auto" order."""
    monkeypatch.setattr("clisc.runtime.forwards.AUTO_ORDER", ("torch",))


@pytest.fixture
def clisc_home(tmp_path, monkeypatch):
    """An empty weights cache for the test."""
    home = tmp_path / "clisc_home"
    monkeypatch.setenv("CLISC_HOME", str(home))
    return home


def write_dicom_series(folder: Path, array: np.ndarray, series_uid: str, spacing=(0.8, 0.8, 2.5),
                       origin=(-100.0, -120.0, 30.0)) -> None:
    """Write ``array`` (K, J, I) int16 as a DICOM CT series, one file per slice (SimpleITK/GDCM)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, plane in enumerate(array):
        image = sitk.GetImageFromArray(plane.astype(np.int16)[np.newaxis])
        image.SetSpacing(spacing)
        position = (origin[0], origin[1], origin[2] + k * spacing[2])
        image.SetOrigin(position)
        for tag, value in {
            "0008|0060": "CT", "0020|000e": series_uid, "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0008|0018": f"{series_uid}.{k + 1}", "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{x:.3f}" for x in position), "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": str(spacing[2]), "0028|0030": f"{spacing[1]}\\{spacing[0]}",
        }.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid}_{k:03d}.dcm"))
        writer.Execute(image)
