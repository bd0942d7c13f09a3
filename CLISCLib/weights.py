"""Model weights in Slicer: what a run needs downloaded, and the Models section of CLISCSegment's panel.

- `missingModels`, `modelsFolder`, `installedModels`: the weights cache (``$CLISC_HOME/models``), asked of the engine
  (`clisc.models.cache`); `formatSize` for people.
- `WeightsSection`: the first-run download of weights (a progress dialog; an offline import when the download fails)
  and the Models section (the folder, each installed model's size, Remove).

Only this computer's runs need weights here: a server has its own.
"""
import functools
from pathlib import Path
from typing import Optional

import qt
import slicer

from CLISCLib.jobs import ThreadJob
from CLISCLib.progress import runWithProgressDialog


def formatSize(size: int) -> str:
    """A size in bytes for people: "2.4 GB", "350 MB", "12 kB"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}" if size < 10 * scale else f"{size / scale:.0f} {unit}"
    return f"{size} B"


def missingModels(clip=None, sam=None) -> list:
    """The catalogue names among ``clip`` and ``sam`` (None: the engine's defaults) not downloaded yet."""
    from clisc.models.cache import is_installed
    from clisc.models.catalogue import CATALOGUE
    from clisc.zeroshot import SegmentOptions

    entries = {entry.name: entry for entry in CATALOGUE}
    names = [SegmentOptions.clip if clip is None else clip, SegmentOptions.sam if sam is None else sam]
    return [name for name in names if isinstance(name, str) and name in entries and not is_installed(entries[name])]


def modelsFolder() -> Path:
    """Where downloaded weights are kept: ``$CLISC_HOME/models`` (default ``~/.clisc/models``)."""
    from clisc.models.cache import clisc_home

    return clisc_home() / "models"


def installedModels() -> list:
    """The catalogue models with files in the weights folder, as (name, folder, size in bytes of those files),
    in catalogue order. A partial download (which the next download resumes) is not counted."""
    from clisc.models.cache import installed_size, model_dir
    from clisc.models.catalogue import CATALOGUE

    models = [(entry.name, model_dir(entry.name), installed_size(entry.name)) for entry in CATALOGUE]
    return [model for model in models if model[2]]


def removeModel(name: str) -> None:
    """Delete the weights ``name`` from the weights folder; they are downloaded again when needed."""
    from clisc.models.cache import remove_model

    remove_model(name)


class WeightsSection:
    """The Models section of a panel (``ui``: modelsCollapsibleButton, modelsFolderLabel, modelsTable,
    removeModelButton) and the download of missing weights. ``logic.removeModel(name)`` deletes them."""

    def __init__(self, ui, logic, log) -> None:
        self.ui, self.logic, self.log = ui, logic, log
        ui.modelsCollapsibleButton.connect("contentsCollapsed(bool)", lambda collapsed: collapsed or self.listModels())
        ui.modelsTable.connect("itemSelectionChanged()", self.updateButtons)
        ui.removeModelButton.connect("clicked(bool)", self.onRemove)

    def ensureModels(self, clip: Optional[str], sam: Optional[str]) -> bool:
        """`ensureWeights` of the CLIP and SAM a segmentation needs (None: the engine's defaults)."""
        return self.ensureWeights(missingModels(clip, sam))

    def ensureWeights(self, names: list) -> bool:
        """Download the catalogue weights ``names`` (not in the cache yet), with a progress dialog; offer an
        offline import when the download fails. True when all are installed."""
        from clisc.errors import Cancelled
        from clisc.models.cache import download_model, import_model
        from clisc.models.catalogue import get_entry
        from clisc.models.download import DownloadError

        for name in names:
            entry = get_entry(name)
            if slicer.app.testingEnabled():
                raise RuntimeError(f"model weights '{name}' are not installed (not downloaded in testing mode)")
            if not slicer.util.confirmOkCancelDisplay(
                    f"CLISC needs the weights '{name}' ({entry.description} Licence: {entry.licence}).\n"
                    f"Download them now from {entry.homepage}?"):
                return False
            try:
                download = ThreadJob(functools.partial(download_model, name))
                download.start()
                runWithProgressDialog(
                    download, "CLISC: downloading weights", f"Downloading {name}...",
                    lambda progress: (f"{progress.stage}: {progress.done / 1e6:.0f} of {progress.total / 1e6:.0f} MB"
                                      if progress.total else progress.stage))
            except Cancelled:
                self.log(f"Download of {name} cancelled; it resumes next time.")
                return False
            except DownloadError as error:
                oneFile = len(entry.files) == 1
                if not slicer.util.confirmOkCancelDisplay(
                        f"{error}\n\nImport a copy from this computer instead "
                        f"({'the file ' + entry.files[0].filename if oneFile else 'a folder holding its files'})?"):
                    return False
                source = (qt.QFileDialog.getOpenFileName(None, f"Weights file for {name}") if oneFile
                          else qt.QFileDialog.getExistingDirectory(None, f"Folder with the files of {name}"))
                if not source:
                    return False
                with slicer.util.WaitCursor():
                    import_model(name, source)
            self.log(f"Installed the weights {name}.")
            self.listModels()
        return True

    def listModels(self) -> None:
        """Show the weights folder, and each model in it with its size (when the Models section opens, and after a
        download: listing imports the engine)."""
        try:
            folder, models = modelsFolder(), installedModels()
        except ImportError as error:  # the engine's packages are not installed yet: the first Segment installs them
            self.ui.modelsFolderLabel.text = f"Shown once CLISC's Python packages are installed ({error})."
            return
        self.ui.modelsFolderLabel.text = f"Folder: {folder}"
        self.ui.modelsTable.setRowCount(len(models))
        for row, (name, path, size) in enumerate(models):
            for column, text in enumerate((name, formatSize(size))):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(str(path))
                self.ui.modelsTable.setItem(row, column, item)
        self.updateButtons()

    def updateButtons(self) -> None:
        self.ui.removeModelButton.enabled = bool(self.ui.modelsTable.selectedItems())

    def onRemove(self) -> None:
        row = self.ui.modelsTable.currentRow()
        name = self.ui.modelsTable.item(row, 0).text()
        path = self.ui.modelsTable.item(row, 0).toolTip()
        if slicer.util.confirmOkCancelDisplay(f"Delete the weights '{name}' ({path})?\n"
                                              "They are downloaded again when a segmentation needs them."):
            with slicer.util.tryWithErrorDisplay(f"Could not delete the weights '{name}'.", waitCursor=True):
                self.logic.removeModel(name)
                self.log(f"Deleted the weights {name}.")
            self.listModels()
