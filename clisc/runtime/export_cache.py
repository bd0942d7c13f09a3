"""Exported copies of torch modules for a CPU runtime, cached in ``$CLISC_HOME/runtimes/`` and never trusted blindly.

An entry is a folder named by everything its files depend on: the sha256 of the module's weights (its state dict,
in order), the module's class, the input shape, the runtime and its version, torch's version and `EXPORT_FORMAT`.
It holds the runtime's model files, ``probe.npz`` (a seeded probe input and the module's float32 torch outputs
for it, computed at export time) and ``entry.json`` (each file's sha256 and the export's seconds). An entry is
written in a temporary folder beside its place and renamed into it whole, so an interrupted or concurrent
export never leaves half an entry. Before use, the files' hashes are checked (`read_entry`) and the caller
compares the runtime's outputs on the probe with torch's (`clisc.runtime.forwards`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..models.cache import clisc_home, file_sha256

logger = logging.getLogger(__name__)

EXPORT_FORMAT = 1  # bump when what an export writes changes: older entries are then never read
ENTRY_FILE = "entry.json"
PROBE_FILE = "probe.npz"


def runtimes_dir() -> Path:
    return clisc_home() / "runtimes"


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 of the module's state dict: each entry's name, dtype, shape and bytes, in order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def entry_folder(name: str, module: torch.nn.Module, input_shape: Sequence[int], runtime: str, version: str) -> Path:
    """Where the export of ``module`` for ``runtime`` (at ``version``) and inputs of ``input_shape`` lives."""
    key = json.dumps([type(module).__module__, type(module).__qualname__, weights_sha256(module), list(input_shape),
                      runtime, version, torch.__version__, EXPORT_FORMAT])
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


def probe(folder: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """The entry's probe input and the module's float32 torch outputs for it."""
    with np.load(folder / PROBE_FILE) as stored:
        return stored["input"], [stored[f"output{n}"] for n in range(len(stored.files) - 1)]


def export_entry(folder: Path, export: Callable[[Path], None], module: torch.nn.Module, probe_input: torch.Tensor,
                 ) -> dict:
    """Write the entry ``folder``: ``export(tmp)`` writes the runtime's files into a temporary folder, the probe
    and the record are added, and the folder is renamed into place (another process's complete entry, if one
    got there first, is kept). Returns the record."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        started = time.perf_counter()
        export(tmp)
        seconds = time.perf_counter() - started
        with torch.no_grad():
            outputs = module(probe_input)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        np.savez(tmp / PROBE_FILE, input=probe_input.numpy(),
                 **{f"output{n}": o.float().numpy() for n, o in enumerate(outputs)})
        files = sorted(p.name for p in tmp.iterdir())
        record = {"format": EXPORT_FORMAT, "export_seconds": round(seconds, 2),
                  "sha256": {f: file_sha256(tmp / f) for f in files}}
        (tmp / ENTRY_FILE).write_text(json.dumps(record, indent=1))
        if folder.exists():  # a stale or broken entry (read_entry refused it): replace it
            shutil.rmtree(folder, ignore_errors=True)
        try:
            tmp.rename(folder)
        except OSError:  # another process renamed its complete entry into place first
            return read_entry(folder) or record
        return record
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
