"""Exported copies of torch modules for a CPU runtime, cached in ``$CLISC_HOME/runtimes/``.

An entry is a folder named by everything its files depend on: the sha256 of the module's weights (its state dict,
in order), the module's class and the source files of every class it is built of (`code_sha256`), the input
shapes, the runtime and its version, torch's version and `EXPORT_FORMAT`. It holds the runtime's model files, the
module's own float32 outputs on the probe input (``probe.npz``, so that a later run checks the runtime without a
PyTorch forward) and ``entry.json`` (each file's sha256 and the export's seconds). An entry is written in a
temporary folder beside its place and renamed into it whole, so an interrupted or concurrent export never leaves
half an entry. `read_entry` checks every file's sha256 before use; the caller then checks the runtime's outputs
against the module's (`clisc.runtime.forwards`), so a cached file is never trusted on its name alone.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..models.cache import clisc_home, file_sha256

logger = logging.getLogger(__name__)

EXPORT_FORMAT = 3  # bump when what an export writes changes: older entries are then never read
ENTRY_FILE = "entry.json"


def runtimes_dir() -> Path:
    return clisc_home() / "runtimes"


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 of the module's state dict: each entry's name, dtype, shape and bytes, in order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def code_sha256(module: torch.nn.Module) -> str:
    """sha256 of the source files of every class ``module`` is built of (itself and its submodules), in path
    order: an export, and the probe outputs kept with it, are of that code as much as of the weights."""
    digest = hashlib.sha256()
    for path in sorted({_source_file(type(part)) for part in module.modules()} - {None}):
        digest.update(path.encode() + Path(path).read_bytes())
    return digest.hexdigest()


def _source_file(cls: type) -> Optional[str]:
    try:
        return inspect.getsourcefile(cls)
    except TypeError:  # a class defined in C
        return None


def entry_folder(name: str, module: torch.nn.Module, input_shapes: Sequence[Sequence[int]], runtime: str,
                 version: str) -> Path:
    """Where the export of ``module`` for ``runtime`` (at ``version``) and inputs of ``input_shapes`` lives."""
    key = json.dumps([type(module).__module__, type(module).__qualname__, weights_sha256(module), code_sha256(module),
                      [list(shape) for shape in input_shapes], runtime, version, torch.__version__, EXPORT_FORMAT])
    return runtimes_dir() / f"{name}-{runtime}-{hashlib.sha256(key.encode()).hexdigest()[:20]}"


def read_entry(folder: Path) -> Optional[dict]:
    """The entry's record, or None when it is absent, incomplete or any of its files fails its sha256."""
    try:
        record = json.loads((folder / ENTRY_FILE).read_text())
        if record.get("format") != EXPORT_FORMAT:
            return None
        for filename, sha256 in record["sha256"].items():
            if file_sha256(folder / filename) != sha256:
                logger.warning("%s: %s does not match its recorded sha256; exporting again", folder, filename)
                return None
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


def export_entry(folder: Path, export: Callable[[Path], None]) -> dict:
    """Write the entry ``folder``: ``export(tmp)`` writes the runtime's files into a temporary folder, the record
    is added, and the folder is renamed into place (another process's complete entry, if one got there first,
    is kept). Returns the record."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        started = time.perf_counter()
        export(tmp)
        record = {"format": EXPORT_FORMAT, "export_seconds": round(time.perf_counter() - started, 2),
                  "sha256": {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}}
        (tmp / ENTRY_FILE).write_text(json.dumps(record, indent=1))
        if folder.exists():  # a broken or stale entry (read_entry refused it)
            shutil.rmtree(folder, ignore_errors=True)
        try:
            tmp.rename(folder)
        except OSError:  # another process renamed its complete entry into place first
            return read_entry(folder) or record
        return record
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
