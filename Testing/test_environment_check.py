"""The environment check: the floors are pyproject.toml's, and an old or missing package gets one clear message."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from clisc.environment import (
    REQUIREMENTS,
    TORCH_PACKAGES,
    check_environment,
    fix_command,
    paired_torchvision,
    problems,
    release,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ALL_NEW = {r.distribution: "99.0" for r in REQUIREMENTS}


def test_the_floors_are_the_ones_pyproject_declares():
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == [str(r) for r in REQUIREMENTS]
    assert project["requires-python"] == ">=3.10"


def test_this_environment_passes_the_check():
    check_environment()


def test_an_old_open_clip_and_a_missing_monai_are_named_with_the_fix():
    found = problems({**ALL_NEW, "open-clip-torch": "2.31.0", "monai": None})
    assert found == [
        "open-clip-torch 2.31.0 is too old: CLISC needs open-clip-torch>=3.0 (open_clip's local-dir: model folders)",
        "monai is not installed (CLISC needs monai>=1.5)",
    ]
    fix = fix_command(found)
    assert "pip install 'open-clip-torch>=3.0' 'monai>=1.5'" in fix
    assert "torch" not in fix.replace("open-clip-torch", "")


def test_torch_is_never_in_the_pip_command_it_is_the_users():
    found = problems({**ALL_NEW, "torch": "2.1.0", "torchvision": None})
    assert len(found) == 2
    fix = fix_command(found)
    assert "pip install" not in fix and "PyTorch Utils" in fix
    assert set(TORCH_PACKAGES) == {"torch", "torchvision"}


def test_python_3_9_is_refused_with_the_slicer_to_use():
    found = problems(ALL_NEW, python=(3, 9, 10))
    assert found == ["Python 3.9.10 is too old: CLISC needs Python 3.10 or newer (in 3D Slicer: Slicer 5.10 or newer)"]
    assert problems(ALL_NEW, python=(3, 12, 1)) == []


@pytest.mark.parametrize("torch_version, torchvision", [
    ("2.13.0+cpu", "0.28"), ("2.14.1", "0.29"), ("2.4.1", "0.19"), ("1.13.1", None)])
def test_paired_torchvision(torch_version, torchvision):
    assert paired_torchvision(torch_version) == torchvision


def test_release_ignores_local_and_pre_release_labels():
    assert release("2.13.0+cpu") == (2, 13, 0)
    assert release("1.0rc1") == (1, 0)
    assert release("0.29.1+cu130") > release("0.29")
