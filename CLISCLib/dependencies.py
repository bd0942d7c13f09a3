"""What CLISC needs in Slicer, and installing it on first use: a Slicer new enough, and the engine's packages.

The engine's requirements come from `clisc.environment` (standard library only, so it loads before they are
installed), in two parts. torch and torchvision belong to the PyTorch extension, whose PyTorchUtils installs the
build that fits the computer (`installTorch`); Slicer's pip installs the others (`installPackages`), with a
constraints file that keeps the installed versions of `PINNED`. What is missing is decided by installed versions,
not by whether a module imports. `ensurePackages` is the first-run dialogue both modules' GUIs go through; nothing
is installed when a module loads, nor in testing mode. Run on a server (`CLISCLib.remote`), a module needs only
`CLIENT_REQUIREMENTS`: neither torch nor any other engine package is installed then.
"""
import importlib
import importlib.metadata
import re
import sys
import tempfile
from pathlib import Path
from typing import Optional

import slicer

from clisc.environment import MINIMUM_PYTHON, TORCH_PACKAGES
from clisc.environment import REQUIREMENTS as ENGINE_REQUIREMENTS

TORCH_REQUIREMENTS = [str(r) for r in ENGINE_REQUIREMENTS if r.distribution in TORCH_PACKAGES]
REQUIREMENTS = [str(r) for r in ENGINE_REQUIREMENTS if r.distribution not in TORCH_PACKAGES]
PINNED = ("torch", "torchvision", "numpy", "SimpleITK")  # the PyTorch extension's and Slicer's own
CLIENT_REQUIREMENTS = ["pynrrd>=1.0"]  # the remote client's: it reads and writes the arrays as NRRD (numpy is Slicer's)


# -- Slicer

def unsupportedSlicerMessage() -> Optional[str]:
    """Why this Slicer cannot run CLISC (its Python is older than 3.10: Slicer 5.8 or older), or None."""
    if tuple(sys.version_info[:2]) >= MINIMUM_PYTHON:
        return None
    application = getattr(slicer, "app", None)  # absent outside the Slicer application
    return (f"CLISC needs 3D Slicer 5.10 or newer (this is Slicer "
            f"{application.applicationVersion if application else 'unknown'} with Python "
            f"{sys.version_info[0]}.{sys.version_info[1]}). Install the current Slicer from "
            "https://download.slicer.org and add the CLISC extension to it.")


def requireSupportedSlicer() -> None:
    """Raise RuntimeError with `unsupportedSlicerMessage` in a Slicer too old for CLISC (the Logics call it)."""
    unsupported = unsupportedSlicerMessage()
    if unsupported:
        raise RuntimeError(unsupported)


def showUnsupportedSlicer(layout) -> bool:
    """Show, in place of a module's controls, why this Slicer cannot run CLISC; True if it cannot."""
    import qt

    unsupported = unsupportedSlicerMessage()
    if unsupported:
        label = qt.QLabel(unsupported)
        label.wordWrap = True
        layout.addWidget(label)
    return unsupported is not None


# -- installed versions and requirements

def canonicalName(distribution: str) -> str:
    """A distribution name as pip compares them: "Open_CLIP.torch" -> "open-clip-torch"."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def installedVersions() -> dict:
    """Installed Python distributions: canonical name -> version (the first found on the path, as import does)."""
    versions = {}
    for dist in importlib.metadata.distributions():
        if dist.metadata["Name"]:
            versions.setdefault(canonicalName(dist.metadata["Name"]), dist.version)
    return versions


def _packaging():
    """The ``packaging`` library (requirements and versions); in a Slicer without it, the copy inside pip."""
    try:
        import packaging.requirements
        import packaging.version
    except ImportError:
        import pip._vendor.packaging.requirements
        import pip._vendor.packaging.version
        return pip._vendor.packaging
    return packaging


def unmetRequirements(requirements, installed: dict) -> list:
    """The pip requirements that the installed versions (canonical name -> version) leave unmet: missing or too
    old."""
    Requirement = _packaging().requirements.Requirement
    unmet = []
    for text in requirements:
        requirement = Requirement(text)
        version = installed.get(canonicalName(requirement.name))
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            unmet.append(text)
    return unmet


def missingPackages(requirements=None) -> list:
    """The ``requirements`` (default `REQUIREMENTS`) that the installed distributions leave unmet (missing or too
    old)."""
    return unmetRequirements(REQUIREMENTS if requirements is None else requirements, installedVersions())


def missingTorch() -> list:
    """The unmet requirements of `TORCH_REQUIREMENTS`: for the PyTorch extension to install (`installTorch`),
    never pip here."""
    return unmetRequirements(TORCH_REQUIREMENTS, installedVersions())


# -- installing

def pipConstraints(installed: dict) -> str:
    """A pip constraints file that pins the installed versions of `PINNED`, so that installing the other packages
    cannot replace the PyTorch extension's torch and torchvision or Slicer's numpy and SimpleITK."""
    return "".join(f"{name}=={installed[canonicalName(name)]}\n" for name in PINNED if canonicalName(name) in installed)


def installPackages(requirements=None) -> list:
    """pip-install `missingPackages` of ``requirements`` (never torch or torchvision) with a constraints file pinning
    the installed `PINNED` packages, through ``slicer.packaging.pip_ensure`` (Slicer 5.12) or
    ``slicer.util.pip_install``. Returns the distributions whose installed version changed (Slicer must restart to
    use them)."""
    missing = missingPackages(requirements)
    if not missing:
        return []
    before = installedVersions()
    with tempfile.TemporaryDirectory() as folder:
        constraints = Path(folder) / "constraints.txt"
        constraints.write_text(pipConstraints(before), encoding="utf-8")
        try:
            from slicer.packaging import pip_ensure
        except ImportError:  # Slicer 5.10
            slicer.util.pip_install(["-c", str(constraints), *missing])
        else:
            pip_ensure(missing, constraints=constraints, requester="CLISC", prompt_install=False,
                       prompt_restart=False, skip_in_testing=False)
    importlib.invalidate_caches()
    after = installedVersions()
    return sorted(name for name, version in before.items() if after.get(name, version) != version)


def torchInstallArguments(installed: dict) -> dict:
    """Keyword arguments for ``PyTorchUtils.PyTorchUtilsLogic().installTorch`` that install what
    `TORCH_REQUIREMENTS` lacks. An installed torch is kept (its exact release is asked for, so that a missing
    torchvision comes paired with it); a torch too old for CLISC cannot be replaced in a running Slicer:
    RuntimeError says how to update it."""
    packaging = _packaging()
    torch, torchvision = (packaging.requirements.Requirement(text) for text in TORCH_REQUIREMENTS)
    torchVersion = installed.get("torch")
    if torchVersion is None:
        torchSpecifier = str(torch.specifier)
    elif unmetRequirements([str(torch)], installed):
        raise RuntimeError(
            f"CLISC needs {torch}, and this Slicer has torch {torchVersion}. Update it in the PyTorch Utils module "
            "(Uninstall PyTorch, restart Slicer, Install PyTorch), then try again.")
    else:
        torchSpecifier = f"=={packaging.version.Version(torchVersion).public}"
    arguments = {"askConfirmation": True, "torchVersionRequirement": torchSpecifier}
    if str(torchvision.specifier):  # only newer PyTorchUtils take this argument
        arguments["torchvisionVersionRequirement"] = str(torchvision.specifier)
    return arguments


def installTorch() -> bool:
    """Have the PyTorch extension's PyTorchUtils install torch and torchvision (the build for this computer's GPU
    or CPU; it asks the user first). True when it did."""
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise RuntimeError("CLISC needs PyTorch, which the PyTorch extension installs: install \"PyTorch\" from the "
                           "Extensions Manager, restart Slicer and try again.") from None
    arguments = torchInstallArguments(installedVersions())
    if PyTorchUtils.PyTorchUtilsLogic().installTorch(**arguments) is None:
        return False
    importlib.invalidate_caches()
    return True


def ensurePackages(log, remote: bool = False) -> bool:
    """Before a run (both modules' GUIs): install the engine's missing Python packages once the user agrees, torch
    and torchvision through the PyTorch extension, the others with pip; with ``remote`` (the engine runs on a
    server), only `CLIENT_REQUIREMENTS`. Nothing is installed in testing mode. True when the engine can run now;
    False when the user declined or Slicer must restart first. ``log(text)`` reports progress."""
    requirements = CLIENT_REQUIREMENTS if remote else REQUIREMENTS
    missingTorchNow, missing = [] if remote else missingTorch(), missingPackages(requirements)
    if not missingTorchNow + missing:
        return True
    if slicer.app.testingEnabled():
        raise RuntimeError("missing Python packages (not installed in testing mode): "
                           + ", ".join(missingTorchNow + missing))
    if missingTorchNow:
        if not installTorch():
            return False
        missing = missingPackages(requirements)
    if missing:
        if not slicer.util.confirmOkCancelDisplay(
                f"CLISC needs these Python packages: {', '.join(missing)}.\n"
                "Install them now? It takes a few minutes and needs an internet connection. "
                "PyTorch stays as the PyTorch extension installed it."):
            return False
        log(f"Installing {', '.join(missing)}...")
        with slicer.util.WaitCursor():
            changed = installPackages(requirements)
        if changed or missingPackages(requirements):  # pip upgraded a package this session may have imported already
            note = f" ({', '.join(changed)} changed version)" if changed else ""
            if slicer.util.confirmOkCancelDisplay(f"The packages are installed{note}; Slicer must restart to use "
                                                  "them. Restart now?"):
                slicer.util.restart()
            return False
    return True
