"""Stand-ins for the Qt side of 3D Slicer, and a headless MRML application from slicer-core.

slicer-core (PyPI) is Slicer's real MRML layer (scene, nodes, module logics, ``slicer.util``) without Qt: it
has no ``slicer.ScriptedLoadableModule``, no ``slicer.parameterNodeWrapper``, no ``qt`` and no application.
`install` adds minimal stand-ins for those, enough for a scripted module file to import and for its Logic to
run on real MRML. Widgets are not built here: that needs real Slicer (the module's self-test covers it).
`start_mrml` registers the Colors, Volumes, Segmentations and SubjectHierarchy logics on an application logic
and sets ``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()``, which ``slicer.util``'s volume and
segmentation helpers use. `import_module` does both and imports one of our module files (or CLISCLib, the
package both import).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import tempfile
import types
import unittest
from dataclasses import dataclass
from pathlib import Path

import slicer

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("CLISCSegment", "CLISCTrain")  # the scripted modules of the extension, each in its own folder
LIBRARY = "CLISCLib"  # the package both modules import, installed beside them


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.parent = parent


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=1000):
        logging.info(message)


def parameterNodeWrapper(classtype):
    """The real decorator adds typed access to a parameter node and GUI binding; here the class stays as written."""
    return classtype


@dataclass
class Choice:
    choices: list


def install() -> None:
    """Make ``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper`` and ``qt`` importable."""
    contents = {
        "ScriptedLoadableModule": [ScriptedLoadableModule, ScriptedLoadableModuleWidget,
                                   ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest],
        "parameterNodeWrapper": [parameterNodeWrapper, Choice],
    }
    for name, objects in contents.items():
        module = types.ModuleType(f"slicer.{name}")
        module.__dict__.update({o.__name__: o for o in objects})
        sys.modules[module.__name__] = module
        setattr(slicer, name, module)
    # Module files import qt at the top but use it only in their widgets.
    sys.modules.setdefault("qt", types.ModuleType("qt"))


class _Module:
    """What ``slicer.modules.<name>`` offers the scripted code that runs here: its logic."""

    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


_application = None  # keeps the application logic (and through it the module logics) alive


def start_mrml():
    """A real MRML scene with the module logics that ``slicer.util`` needs; returns ``slicer.mrmlScene``."""
    global _application
    if _application is not None:
        return slicer.mrmlScene
    home = tempfile.mkdtemp(prefix="slicer_home_")
    os.makedirs(os.path.join(home, "share", "ColorFiles"))  # the colour logic looks for user colour tables here
    scene = slicer.vtkMRMLScene()
    application = slicer.vtkSlicerApplicationLogic()
    application.SetMRMLScene(scene)
    application.SetHomeDirectory(home)
    application.SetShareDirectory("share")
    modules = {}
    for name, logic_class in (("Colors", slicer.vtkSlicerColorLogic), ("Volumes", slicer.vtkSlicerVolumesLogic),
                              ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                              ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic)):
        logic = logic_class()
        logic.SetMRMLApplicationLogic(application)
        logic.SetMRMLScene(scene)
        application.SetModuleLogic(name, logic)
        modules[name.lower()] = _Module(logic)
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(**modules)
    _application = application
    return scene


def import_module(name: str):
    """Our scripted module file ``name`` (e.g. "CLISCTrain", or "CLISCLib.jobs"), imported with the stand-ins on a
    started MRML application. Every module folder, and the folder holding CLISCLib, is put on ``sys.path``, as
    Slicer puts its scripted modules and their lib folder there."""
    install()
    start_mrml()
    for folder in [ROOT / module for module in MODULES] + [ROOT]:
        if str(folder) not in sys.path:
            sys.path.append(str(folder))
    return importlib.import_module(name)
