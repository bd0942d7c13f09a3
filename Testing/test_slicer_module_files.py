"""The files of both Slicer modules, of the CLISCLib package they share, and of the extension, checked as text: the
widget itself needs real Slicer (Qt), so what can be checked here is that every widget the code uses is in the .ui,
that every parameter-node field is bound to a widget of a matching kind, that a module file holds only its module's
classes and leaves what both share to CLISCLib, that the CMake lists install every Python file and resource, that
the extension's metadata passes the Slicer Extensions Index checks, and that importing a module file or CLISCLib
installs nothing."""
from __future__ import annotations

import ast
import importlib
import json
import os
import re
import socket
import subprocess
import sys
import types
import typing
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit
from xml.etree import ElementTree

import pytest
from conftest import slicer_module

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("CLISCSegment", "CLISCTrain")
LIBRARY = "CLISCLib"
LIBRARY_MODULES = [LIBRARY] + sorted(f"{LIBRARY}.{p.stem}" for p in (ROOT / LIBRARY).glob("*.py") if p.stem != "__init__")
# The CLISCLib parts of each module's panel, on its .ui's widgets (``ui.X``).
PANEL_PARTS = {"CLISCSegment": ("refineSection", "serverSection", "weights"), "CLISCTrain": ("serverSection",)}
OPTIONAL_WIDGETS = {"serverSection": {"runOnComboBox"}}  # without one, a panel always runs on the server
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
    shared = set(re.findall(r"self\.ui\.(\w+)", (ROOT / LIBRARY / "widget.py").read_text(encoding="utf-8")))
    assert shared and shared <= set(widgets), f"CLISCLib's widget uses, not in the .ui: {sorted(shared - set(widgets))}"
    for part in PANEL_PARTS[name]:
        uses = set(re.findall(r"\bui\.(\w+)", (ROOT / LIBRARY / f"{part}.py").read_text(encoding="utf-8")))
        uses -= OPTIONAL_WIDGETS.get(part, set()) - set(widgets) if name != "CLISCSegment" else set()
        assert uses and uses <= set(widgets), f"CLISCLib.{part} uses, not in the .ui: {sorted(uses - set(widgets))}"

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


# -- the extension's metadata, as the Slicer Extensions Index checks it
# (Slicer/ExtensionsIndex scripts/check_description_files.py: the catalogue entry against its JSON schema, the
# extension and repository names, the category, the scm_url, CMakeLists' icon and screenshot URLs, a LICENSE file)

SCHEMA = ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
          "slicer-extension-catalog-entry-schema-v1.0.1.json#")
SCHEMA_PROPERTIES = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                     "build_subdirectory", "enabled", "tier"}  # that schema's "additionalProperties": false
SCHEMA_REQUIRED = {"$schema", "category", "scm_url"}


def cmake_metadata() -> dict:
    """EXTENSION_* -> value, from the top-level CMakeLists.txt, each on one line as the index's check reads it."""
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    return dict(re.findall(r'^set\((EXTENSION_\w+) "([^"]*)"\)$', text, re.M))


def repository_file(url: str, homepage: str) -> Path:
    """The file in this repository that a raw.githubusercontent.com URL of the homepage's repository names."""
    owner_repo = urlsplit(homepage).path.strip("/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert url.startswith(prefix), url
    return ROOT / url[len(prefix):]


def test_extension_metadata_is_complete_and_its_urls_point_at_files_in_this_repository():
    metadata = cmake_metadata()
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert metadata.get(f"EXTENSION_{key}", "").strip(), f"EXTENSION_{key} is empty"
    homepage = urlsplit(metadata["EXTENSION_HOMEPAGE"])
    assert homepage.scheme == "https" and homepage.netloc == "github.com" and homepage.path.count("/") == 2
    for contributor in metadata["EXTENSION_CONTRIBUTORS"].split(", "):
        assert re.fullmatch(r"[^(),]+ \([^()]+\)", contributor), f"not 'Name (Affiliation)': {contributor}"
    assert metadata["EXTENSION_DEPENDS"].split() == ["PyTorch"]

    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    icon = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', text)  # the index check's own patterns
    screenshots = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', text)
    assert icon and screenshots
    for url in icon + screenshots[0].split():
        path = repository_file(url, metadata["EXTENSION_HOMEPAGE"])
        assert path.is_file(), f"{url}: {path} is not in the repository"
        assert path.suffix == ".png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_catalogue_entry_follows_the_schema_and_agrees_with_cmake():
    path = ROOT / "CLISC.json"
    raw = path.read_bytes()
    assert b"\r" not in raw  # the index check wants LF line endings
    entry = json.loads(raw)
    assert entry["$schema"] == SCHEMA
    assert SCHEMA_REQUIRED <= set(entry) <= SCHEMA_PROPERTIES
    assert entry.get("tier", 1) in (1, 3, 5)

    metadata = cmake_metadata()
    project = re.search(r"^project\((\w+)\)", (ROOT / "CMakeLists.txt").read_text(encoding="utf-8"), re.M).group(1)
    assert path.stem == project and not project.lower().startswith("slicer")  # the file is named after the extension
    assert entry["category"] == metadata["EXTENSION_CATEGORY"]
    assert entry["build_dependencies"] == metadata["EXTENSION_DEPENDS"].split()
    scm = urlsplit(entry["scm_url"])
    assert scm.scheme == "https" and entry["scm_url"].removesuffix(".git") == metadata["EXTENSION_HOMEPAGE"]
    assert "slicer" in scm.path.rsplit("/", 1)[-1].lower()  # the repository is named Slicer<Extension>


def test_licence_file_is_the_apache_2_licence_the_readme_names():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10000  # the full text, not a notice
    assert "Apache-2.0" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def test_cmake_lists_install_every_library_file_and_resource():
    folder = ROOT / LIBRARY
    scripts = cmake_list(folder / "CMakeLists.txt", "CLISCLIB_PYTHON_SCRIPTS")
    assert set(scripts) == {str(p.relative_to(folder)) for p in folder.rglob("*.py") if "__pycache__" not in p.parts}
    resources = cmake_list(folder / "CMakeLists.txt", "CLISCLIB_PYTHON_RESOURCES")
    assert set(resources) == {str(p.relative_to(folder)) for p in (folder / "Resources").rglob("*") if p.is_file()}
    text = (folder / "CMakeLists.txt").read_text(encoding="utf-8")
    for destination in ("DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/CLISCLib",
                        "INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/CLISCLib"):
        assert destination in text  # beside the modules, on Slicer's Python path
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert top.index(f"add_subdirectory({LIBRARY})") < min(top.index(f"add_subdirectory({name})") for name in MODULES)


def module_tree(name: str) -> ast.Module:
    return ast.parse((ROOT / name / f"{name}.py").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", MODULES)
def test_a_module_file_holds_only_its_modules_classes(name):
    """The Slicer template's shape: Module, Widget, Logic, Test and the parameter node; shared code is CLISCLib's."""
    definitions = [node for node in module_tree(name).body
                   if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    assert sorted(node.name for node in definitions) == sorted(
        name + part for part in ("", "ParameterNode", "Widget", "Logic", "Test"))
    assert all(isinstance(node, ast.ClassDef) for node in definitions)


@pytest.mark.parametrize("name", MODULES)
def test_modules_share_code_through_the_library_not_each_other(name):
    imported = set()
    for node in ast.walk(module_tree(name)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert LIBRARY in imported and not imported & set(MODULES)


def test_clisctrain_leaves_the_run_folder_layout_to_the_engine():
    """Only clisc.cohort.run_folder spells a run folder's paths; CLISCTrain asks it."""
    text = (ROOT / "CLISCTrain" / "CLISCTrain.py").read_text(encoding="utf-8")
    for name in ("config.json", "final.pt", "summary.json", "metrics.json"):
        assert name not in text
    for folder in ("unet", "pseudo_labels", "predictions", "done", "skipped", "cams", "s3f"):
        assert not re.search(rf"/\s*[\"']{folder}[/\"']", text), folder  # a path joined with the folder's name
    assert "RunFolder(" in text


@pytest.mark.parametrize("name", MODULES)
def test_modules_build_with_slicers_generic_tests(name):
    text = (ROOT / name / "CMakeLists.txt").read_text(encoding="utf-8")
    build = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, re.S).group(1)
    assert "WITH_GENERIC_TESTS" in build.split()


def test_importing_the_module_files_and_the_library_installs_and_downloads_nothing(monkeypatch):
    import slicer

    for name in MODULES + tuple(LIBRARY_MODULES):
        slicer_module(name)  # stand-ins and MRML first; all imported once, so all are restored afterwards
    attempts = []

    def refuse(what):
        def refused(*args, **kwargs):
            attempts.append(what)
            raise AssertionError(f"{what} called while importing a module file")
        return refused

    monkeypatch.setattr(subprocess, "Popen", refuse("subprocess.Popen"))
    monkeypatch.setattr(os, "system", refuse("os.system"))
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(urllib.request, "urlopen", refuse("urllib.request.urlopen"))
    monkeypatch.setattr(slicer.util, "pip_install", refuse("slicer.util.pip_install"))
    monkeypatch.setitem(sys.modules, "slicer.packaging",
                        types.SimpleNamespace(pip_ensure=refuse("pip_ensure"), pip_install=refuse("pip_install")))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(
        PyTorchUtilsLogic=lambda: types.SimpleNamespace(installTorch=refuse("PyTorchUtils.installTorch"))))
    for name in MODULES + tuple(LIBRARY_MODULES):
        monkeypatch.delitem(sys.modules, name)
    for name in MODULES:
        assert importlib.import_module(name).__file__ == str(ROOT / name / f"{name}.py")
    for name in LIBRARY_MODULES:  # each on its own too, not only what the module files happen to import
        monkeypatch.delitem(sys.modules, name, raising=False)
        path = ROOT / Path(*name.split(".")) if "." in name else ROOT / name / "__init__.py"
        assert importlib.import_module(name).__file__ == str(path.with_suffix(".py") if "." in name else path)
    assert attempts == []
