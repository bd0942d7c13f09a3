"""The local weights cache: ``$CLISC_HOME/models/NAME/`` (default ``~/.clisc``).

A catalogue entry is installed when all its files are in its folder. Files are downloaded (with resume and
sha256 check, see `download`) or imported from a local copy; either way they arrive under a temporary name
and are renamed only once verified. Where the catalogue publishes no sha256, the hash of the first file
installed is pinned in ``pinned_sha256.json`` and later downloads or imports must match it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from ..errors import InputError
from ..progress import CancelToken, ProgressCallback, no_progress
from .catalogue import CATALOGUE, ModelEntry, RemoteFile, get_entry
from .download import ChecksumError, download

PINS_FILE = "pinned_sha256.json"


def clisc_home() -> Path:
    return Path(os.environ.get("CLISC_HOME", "~/.clisc")).expanduser()


def model_dir(name: str) -> Path:
    return clisc_home() / "models" / name


def is_installed(entry: ModelEntry) -> bool:
    return all((model_dir(entry.name) / f.filename).is_file() for f in entry.files)


def installed_path(entry: ModelEntry) -> Path:
    """What the loaders take: the checkpoint file of a one-file entry, the folder of a multi-file one."""
    folder = model_dir(entry.name)
    return folder / entry.files[0].filename if len(entry.files) == 1 else folder


def model_path(name: str) -> Path:
    """Path of an installed catalogue model; InputError saying how to install it otherwise."""
    entry = _entry(name)
    if not is_installed(entry):
        urls = "\n  ".join(f.url for f in entry.files)
        raise InputError(
            f"model '{name}' is not installed in {model_dir(name)}. Run `clisc models download {name}`, "
            f"or fetch\n  {urls}\nelsewhere and run `clisc models import {name} FILE_OR_FOLDER`."
        )
    return installed_path(entry)


def download_model(name: str, progress: ProgressCallback = no_progress, cancel: Optional[CancelToken] = None) -> Path:
    """Download the missing files of a catalogue entry; returns `installed_path`."""
    entry = _entry(name)
    folder = model_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    pins = _read_pins(folder)
    for remote in entry.files:
        target = folder / remote.filename
        if target.is_file():
            continue
        digest = download(
            remote.url, target, sha256=remote.sha256 or pins.get(remote.filename),
            sha256_prefix=remote.sha256_prefix, size=remote.size, progress=progress, cancel=cancel,
            import_hint=f"clisc models import {name} FILE_OR_FOLDER",
        )
        _pin(folder, remote, digest, pins)
    return installed_path(entry)


def import_model(name: str, source: str | Path) -> Path:
    """Install a catalogue entry from a local copy: the file itself (one-file entries), or a folder that
    holds the entry's files by name. Hashes are checked as for a download; nothing is kept on mismatch."""
    entry = _entry(name)
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    folder = model_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    pins = _read_pins(folder)
    for remote in entry.files:
        origin = source / remote.filename if source.is_dir() else source
        if not origin.is_file():
            raise InputError(f"{source}: {remote.filename} is missing (model '{name}' needs: "
                             f"{', '.join(f.filename for f in entry.files)})")
        partial = folder / (remote.filename + ".part")
        shutil.copyfile(origin, partial)
        digest = file_sha256(partial)
        expected = remote.sha256 or pins.get(remote.filename)
        mismatch = (expected and digest != expected) or (
            not expected and remote.sha256_prefix and not digest.startswith(remote.sha256_prefix))
        if mismatch:
            partial.unlink()
            raise ChecksumError(
                f"{origin}: sha256 {digest} does not match the expected "
                f"{expected or remote.sha256_prefix + '...'} for {remote.filename} of model '{name}' "
                f"({remote.url}); the file was not imported."
            )
        os.replace(partial, folder / remote.filename)
        _pin(folder, remote, digest, pins)
    return installed_path(entry)


def _entry(name: str) -> ModelEntry:
    try:
        return get_entry(name)
    except KeyError:
        raise InputError(f"unknown model '{name}'; catalogue: {', '.join(e.name for e in CATALOGUE)}") from None


def _read_pins(folder: Path) -> dict:
    pins_file = folder / PINS_FILE
    return json.loads(pins_file.read_text()) if pins_file.is_file() else {}


def _pin(folder: Path, remote: RemoteFile, digest: str, pins: dict) -> None:
    if remote.sha256 is None and remote.filename not in pins:
        pins[remote.filename] = digest
        (folder / PINS_FILE).write_text(json.dumps(pins, indent=2))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
