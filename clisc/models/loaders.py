"""Build the real architectures and load their weights (always ``torch.load(..., weights_only=True)``, see
`clisc.models.validate`, which also says what a file that is no checkpoint is).

A model is named by a catalogue name (installed in the cache) or by a local path: a SAM checkpoint file,
or a CLIP folder in open_clip's ``local-dir`` layout (``open_clip_config.json`` + weights, plus the Hugging
Face tokenizer/config files for a BERT text tower such as BiomedCLIP's).
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import InputError
from ..torchvision_compat import import_torchvision
from .cache import file_sha256, model_path
from .catalogue import CATALOGUE
from .sam_builders import build_sam
from .validate import CLIP_WEIGHTS, clip_folder_overrides, load_checkpoint, sam_architecture


def resolve(spec: str | Path, family: str) -> Path:
    """Path of a model given a catalogue name of ``family`` or a local path."""
    names = {e.name: e for e in CATALOGUE}
    spec = str(spec)
    if spec in names:
        if names[spec].family != family:
            raise InputError(f"'{spec}' is a {names[spec].family} model, not a {family} model")
        return model_path(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    choices = ", ".join(e.name for e in CATALOGUE if e.family == family)
    raise InputError(f"{spec}: neither a {family} model in the catalogue ({choices}) nor an existing path")


def describe_model(spec: str | Path, family: str) -> dict:
    """What a report records of a model: what was asked for, the path used and each file's sha256."""
    path = resolve(spec, family)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return {"spec": str(spec), "path": str(path), "sha256": {f.name: file_sha256(f) for f in files}}


def load_sam(spec: str | Path, device: str | torch.device = "cpu"):
    """A `segment_anything.modeling.Sam` in eval mode; architecture (vit_b/l/h, litemedsam) inferred from the
    checkpoint."""
    path = resolve(spec, "sam")
    state_dict = load_checkpoint(path)
    try:
        architecture = sam_architecture(state_dict)
    except InputError as error:
        raise InputError(f"{path}: {error}") from None
    sam = build_sam(architecture)
    try:
        sam.load_state_dict(state_dict)
    except RuntimeError as error:
        raise InputError(f"{path}: does not fit SAM {architecture}: {str(error)[:300]}") from None
    return sam.to(device).eval()


@dataclass
class ClipModel:
    """An open_clip model with what it needs to score images against text."""

    model: torch.nn.Module          # open_clip CLIP / CustomTextCLIP, eval mode
    tokenizer: Callable[[list], torch.Tensor]
    image_size: int                 # square input side in pixels
    mean: tuple                     # per-channel normalisation of RGB in 0..1
    std: tuple
    name: str                       # what the user asked for


def load_clip(spec: str | Path, device: str | torch.device = "cpu") -> ClipModel:
    """An open_clip model from a local-dir folder (catalogue name or path), offline."""
    import_torchvision()
    import open_clip

    folder = resolve(spec, "clip")
    config_file = folder / "open_clip_config.json"
    if not config_file.is_file():
        raise InputError(f"{folder}: not an open_clip model folder (no open_clip_config.json)")
    overrides = clip_folder_overrides(folder, json.loads(config_file.read_text()))
    try:
        model, preprocess = open_clip.create_model_from_pretrained(
            f"local-dir:{folder}", device=device, weights_only=True, **overrides)
    except (RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as error:
        if (folder / CLIP_WEIGHTS).is_file():
            load_checkpoint(folder / CLIP_WEIGHTS)  # says what the file is when it is no plain checkpoint
        raise InputError(f"{folder}: could not load the CLIP model: {str(error)[:300]}") from None
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    normalize = next(t for t in preprocess.transforms if t.__class__.__name__ == "Normalize")
    size = model.visual.image_size
    return ClipModel(model.eval(), tokenizer, int(size[0] if isinstance(size, (tuple, list)) else size),
                     tuple(normalize.mean), tuple(normalize.std), str(spec))
