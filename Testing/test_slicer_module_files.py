"""The files of both Slicer modules, checked as text: the widget itself needs real Slicer (Qt), so what can be
checked here is that every widget the code uses is in the .ui, that every parameter-node field is bound to a
widget of a matching kind, and that the CMake lists install every Python file and resource."""
from __future__ import annotations

import re
import typing
from pathlib import Path
from xml.etree import ElementTree

import pytest
from conftest import slicer_module

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("CLISCSegment", "CLISCTrain")
# The value type the parameter node wrapper binds to each widget class used with SlicerParameterName.
WIDGET_VALUE_TYPES = {"QLineEdit": str, "QCheckBox": bool, "QComboBox": str, "QSpinBox": int}


@pytest.mark.parametrize("name", MODULES)
def test_every_ui_widget_the_code_uses_exists_and_parameters_match_the_ui(name):
    import slicer

    module = slicer_module(name)
    tree = ElementTree.parse(ROOT / name / "Resources" / "UI" / f"{name}.ui")
    widgets = {w.get("name"): w for w in tree.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (ROOT / name / f"{name}.py").read_text(encoding="utf-8")))
    assert used and used <= set(widgets), f"not in the .ui: {sorted(used - set(widgets))}"

    bound = {}  # parameter name -> widget
    for widget in widgets.values():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget
    hints = typing.get_type_hints(getattr(module, f"{name}ParameterNode"), include_extras=True)
    assert set(bound) == set(hints)
    for parameter, widget in bound.items():
        hint, widget_class = hints[parameter], widget.get("class")
        if widget_class == "qMRMLNodeComboBox":  # the wrapper sets the selector's node types from the annotation
            node_types = {t.__name__ for t in (typing.get_args(hint) or (hint,))}
            assert node_types == {s.text for s in widget.iter("string") if s.text.startswith("vtkMRML")}, parameter
            assert all(issubclass(getattr(slicer, t), slicer.vtkMRMLNode) for t in node_types)
            continue
        if widget_class == "QComboBox":  # the wrapper fills combo boxes from a Choice annotation
            assert any(isinstance(a, module.Choice) for a in getattr(hint, "__metadata__", ())), parameter
        value_type = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        assert value_type is WIDGET_VALUE_TYPES[widget_class], parameter


def cmake_list(path: Path, variable: str, module: str = "") -> list:
    text = path.read_text(encoding="utf-8")
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    return [line.strip().replace("${MODULE_NAME}", module) for line in match.group(1).split()
            if not line.strip().startswith("#")]


def test_cmake_lists_install_every_engine_file():
    engine = cmake_list(ROOT / "CMakeLists.txt", "CLISC_ENGINE_SCRIPTS")
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "clisc").rglob("*.py") if "__pycache__" not in p.parts}
    assert set(engine) == on_disk, f"not listed: {sorted(on_disk - set(engine))}; gone: {sorted(set(engine) - on_disk)}"


@pytest.mark.parametrize("name", MODULES)
def test_cmake_lists_install_every_module_file_and_resource(name):
    folder = ROOT / name
    scripts = cmake_list(folder / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS", name)
    assert set(scripts) == {str(p.relative_to(folder)) for p in folder.rglob("*.py") if "__pycache__" not in p.parts}
    resources = cmake_list(folder / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES", name)
    assert set(resources) == {str(p.relative_to(folder)) for p in (folder / "Resources").rglob("*") if p.is_file()}
    assert f"add_subdirectory({name})" in (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
