"""Weights are validated before they are trusted: installed, pinned or loaded only as what they claim to be.

`load_checkpoint` reads a checkpoint with ``torch.load(..., weights_only=True)``: tensors only, no code runs. When
that fails it says what the file is instead (an HTML page, a text file, an empty or truncated file, a TorchScript
archive or a pickle of Python objects, the last two refused for safety) and what to do.

`check_weights` checks that the files of a catalogue entry hold exactly the tensor names and shapes of its
architecture, built on the meta device (no memory is allocated for it):

- SAM (vit_b, vit_l, vit_h, litemedsam; MedSAM is a vit_b): the state dict loads strictly into the `Sam` that
  `sam_builders.build_sam` makes;
- CLIP folder: ``open_clip_config.json`` parses and describes the entry's model (`clip_config_differences`:
  every setting that changes what is computed, such as the activation, widths, layers, patch and image size,
  context length, vocabulary, embedding size and the pixel normalisation), and the weights load strictly (as
  open_clip loads them) into the model open_clip builds from that config;
- classifier: the state dict loads strictly into the ImageNet model `classifier_builders.build_backbone` makes
  (``resnet50``, ``efficientnet-lite0``).
"""
from __future__ import annotations

import inspect
import json
import logging
import re
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable, List, Optional

import torch

from ..errors import InputError
from ..torchvision_compat import import_torchvision
from .catalogue import ModelEntry
from .classifier_builders import backbone_state_dict, build_backbone
from .download import html_page
from .sam_builders import build_sam

CLIP_WEIGHTS = "open_clip_pytorch_model.bin"  # the weights file of a CLIP folder in the catalogue
# image_encoder.patch_embed.proj.weight has embed_dim output channels
SAM_ARCHITECTURE_BY_WIDTH = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
LITEMEDSAM_PATCH_EMBEDDING = "image_encoder.patch_embed.seq.0.c.weight"  # TinyViT's first convolution
SAM_NAMES = {"vit_b": "Segment Anything vit_b", "vit_l": "Segment Anything vit_l", "vit_h": "Segment Anything vit_h",
             "litemedsam": "LiteMedSAM (TinyViT)"}
_REFUSED = ("It is refused for safety: loading it could run code stored in the file. Use the official checkpoint "
            "or, if this file comes from a source you trust, load it in Python there and save its state_dict() "
            "(plain tensors) with torch.save.")


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """A state dict from a checkpoint file, read with ``weights_only=True`` (tensors only, no code).

    A ``model`` or ``state_dict`` entry holding the tensors (training checkpoints) is unwrapped. InputError naming
    the file, saying what it is and what to do, for anything else. ``mmap``: map the tensors from the file
    instead of reading them (a check of a large file that costs no memory; torch's zip format only)."""
    path = Path(path)
    page = html_page(path)
    if page is not None:
        raise InputError(f"{path} is an HTML page, not a checkpoint ({page[0]}?). {page[1]}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as error:  # arbitrary bytes make torch raise almost anything (KeyError for a text file)
        raise InputError(f"{path}: {_not_a_checkpoint(path, error)}") from None
    for key in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict):
        raise InputError(f"{path}: holds a {type(checkpoint).__name__}, not a state dict of tensors")
    return checkpoint


def _not_a_checkpoint(path: Path, error: Exception) -> str:
    """What the file torch could not read is, and what to do, in words."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "the file is empty (an interrupted download or copy?). Fetch it again."
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return ("an incomplete PyTorch archive: its end is missing (a truncated download or copy?). "
                    "Fetch it again.")
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist()):
                return f"a TorchScript archive (a compiled model with its code), not plain tensors. {_REFUSED}"
    pickled = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if pickled:
        return f"a pickle of Python objects ({pickled.group(1)}; a whole pickled model?), not plain tensors. {_REFUSED}"
    if isinstance(error, EOFError) or "truncated" in str(error):
        return "an incomplete PyTorch checkpoint (a truncated download or copy?). Fetch it again."
    text = head.decode("utf-8", "ignore")
    if len(text) > 0.9 * len(head) and all(c.isprintable() or c in "\t\r\n" for c in text):
        return (f"a text file, not a PyTorch checkpoint (it begins {text.strip().splitlines()[0][:60]!r}). "
                "Fetch the checkpoint itself.")
    return "not a PyTorch checkpoint (torch.load cannot read it). Fetch the checkpoint itself."


def sam_architecture(state_dict: dict) -> str:
    """vit_b, vit_l or vit_h, read off the width of the patch embedding; litemedsam for a TinyViT image encoder
    (its patch embedding is a convolution stack)."""
    if isinstance(state_dict.get(LITEMEDSAM_PATCH_EMBEDDING), torch.Tensor):
        return "litemedsam"
    weight = state_dict.get("image_encoder.patch_embed.proj.weight")
    if not isinstance(weight, torch.Tensor):
        raise InputError("not a Segment Anything checkpoint (no image_encoder.patch_embed.proj.weight tensor, "
                         "nor LiteMedSAM's TinyViT)")
    width = weight.shape[0]
    if width not in SAM_ARCHITECTURE_BY_WIDTH:
        raise InputError(f"unknown SAM image encoder width {width}; known: {SAM_ARCHITECTURE_BY_WIDTH}")
    return SAM_ARCHITECTURE_BY_WIDTH[width]


def clip_folder_overrides(folder: Path, config: dict) -> dict:
    """open_clip model arguments that build a folder's CLIP offline: a Hugging Face text tower (BiomedCLIP's) would
    fetch its config from the Hub, so it is pointed at the folder's own config.json and tokenizer files."""
    text_cfg = config.get("model_cfg", {}).get("text_cfg", {})
    if "hf_model_name" not in text_cfg:
        return {}
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: the text tower needs Hugging Face's config.json and tokenizer files "
                         "in the same folder (`clisc models download` fetches them)")
    return {"text_cfg": {**text_cfg, "hf_model_name": str(folder), "hf_tokenizer_name": str(folder),
                         "hf_model_pretrained": False}}


def check_weights(entry: ModelEntry, path: Path) -> None:
    """InputError naming the file unless ``path`` holds exactly the tensors of ``entry``'s architecture.

    ``path`` is what the loaders take: the checkpoint file of a one-file entry, the folder of a CLIP one."""
    if entry.family == "clip":
        check_clip_folder(Path(path), entry)
    else:
        {"sam": _check_sam, "classifier": _check_classifier}[entry.family](Path(path), entry.architecture)


def check_sam_file(path: Path) -> None:
    """InputError naming the file unless it is a SAM checkpoint whose tensors fit the architecture they show
    (vit_b/l/h or LiteMedSAM). The tensors are mapped from the file, not read: a check before any model loads."""
    try:
        architecture = sam_architecture(load_checkpoint(path, mmap=True))
    except InputError as error:
        raise InputError(f"{path}: {error}" if str(path) not in str(error) else str(error)) from None
    _check_sam(Path(path), architecture)


def _check_sam(path: Path, architecture: str) -> None:
    state_dict = load_checkpoint(path, mmap=True)
    # Built without memory on the meta device; TinyViT's constructor reads tensor values, but it is small.
    with _quietly(), torch.device("cpu" if architecture == "litemedsam" else "meta"):
        model = build_sam(architecture)
        problem = _strict_load_problem(lambda: model.load_state_dict(state_dict))
    if problem is None:
        return
    try:
        held = sam_architecture(state_dict)
    except InputError:
        held = architecture
    other = f" (it holds {SAM_NAMES.get(held, held)} weights)" if held != architecture else ""
    raise InputError(f"{path}: not a {SAM_NAMES.get(architecture, architecture)} checkpoint{other}: {problem}. Use this model's "
                     "own file, or import this one under the catalogue name of its architecture.")


def check_clip_folder(folder: Path, entry: Optional[ModelEntry] = None) -> None:
    """InputError naming the file unless ``folder`` holds an open_clip model whose weights load strictly into the
    model its ``open_clip_config.json`` describes, and, for a catalogue ``entry``, unless that config describes
    the entry's model. Nothing is allocated: the model is built on the meta device."""
    import_torchvision()
    import open_clip

    config_file = folder / "open_clip_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["model_cfg"]["vision_cfg"], config["model_cfg"]["text_cfg"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{config_file}: not a readable open_clip config ({type(error).__name__}: {error}). "
                         "Fetch it again.") from None
    if entry is not None:
        differences = clip_config_differences(config, expected_clip_config(entry))
        if differences:
            raise InputError(
                f"{config_file}: describes another CLIP than '{entry.name}' ({entry.architecture}): "
                f"{'; '.join(differences)}. With these settings its weights would compute other features. Use "
                f"the folder of '{entry.name}' itself; to use this CLIP, give its folder to --clip instead.")
    weights = folder / CLIP_WEIGHTS
    load_checkpoint(weights, mmap=True)  # says what the file is when it is no checkpoint at all
    with _quietly(), torch.device("meta"):
        try:
            model = open_clip.create_model(f"local-dir:{folder}", load_weights=False, device="meta",
                                           **clip_folder_overrides(folder, config))
        except (TypeError, ValueError, KeyError, RuntimeError, OSError) as error:
            raise InputError(f"{config_file}: open_clip cannot build a model from it ({error}). "
                             "Fetch it again.") from None
        problem = _strict_load_problem(lambda: open_clip.load_checkpoint(model, str(weights)))
    if problem is not None:
        raise InputError(f"{weights}: does not fit the CLIP model of {config_file.name}: {problem}. "
                         "Fetch both files again, from the same source.")


def expected_clip_config(entry: ModelEntry) -> dict:
    """The open_clip config a catalogue CLIP's folder must describe: the entry's own, else open_clip's built-in
    model config named by its architecture (with open_clip's default pixel mean and std, OpenAI's)."""
    if entry.open_clip_config is not None:
        return entry.open_clip_config
    import open_clip

    model_cfg = open_clip.get_model_config(entry.architecture)
    if model_cfg is None:
        raise ValueError(f"catalogue entry '{entry.name}': open_clip has no model config {entry.architecture!r}")
    return {"model_cfg": model_cfg}


def clip_config_differences(found: dict, expected: dict) -> List[str]:
    """Each setting in which two open_clip configs make models that compute different features, as "key: X
    here, Y expected"; [] when none does. A setting left out counts as open_clip's default. Ignored: where a
    Hugging Face text tower's weights and tokenizer come from (`clip_folder_overrides` points them at the
    folder; its config.json and the strict tensor check settle that tower)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from open_clip.transform import PreprocessCfg

    def settings(config: dict) -> dict:
        model_cfg = dict(config["model_cfg"])
        try:
            vision = asdict(CLIPVisionCfg(**model_cfg.pop("vision_cfg")))
            text = asdict(CLIPTextCfg(**model_cfg.pop("text_cfg")))
        except TypeError as error:  # a key open_clip does not know
            raise InputError(f"open_clip cannot read this config ({error})") from None
        defaults = {name: p.default for name, p in inspect.signature(CLIP.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        flat = {key: model_cfg.get(key, defaults.get(key)) for key in {*model_cfg, *defaults}}
        flat.update({f"vision_cfg.{key}": value for key, value in vision.items()})
        flat.update({f"text_cfg.{key}": value for key, value in text.items() if key not in _TEXT_TOWER_SOURCE})
        preprocess = {**asdict(PreprocessCfg()), **config.get("preprocess_cfg", {})}
        flat.update({f"preprocess_cfg.{key}": [round(float(v), 6) for v in preprocess[key]] for key in ("mean", "std")})
        return flat

    have, want = settings(found), settings(expected)
    return [f"{key}: {_setting(have.get(key), key)} here, {_setting(want.get(key), key)} expected"
            for key in sorted({*have, *want}) if have.get(key) != want.get(key)]


_TEXT_TOWER_SOURCE = ("hf_model_name", "hf_tokenizer_name", "hf_model_pretrained")


def _setting(value, key: str) -> str:
    if key == "quick_gelu":
        return f"{json.dumps(value)} ({'QuickGELU' if value else 'GELU'})"
    return json.dumps(value)


def _check_classifier(path: Path, architecture: str) -> None:
    state_dict = backbone_state_dict(architecture, load_checkpoint(path))
    with _quietly(), torch.device("meta"):
        model = build_backbone(architecture)
        problem = _strict_load_problem(lambda: model.load_state_dict(state_dict))
    if problem is not None:
        raise InputError(f"{path}: not an ImageNet {architecture} checkpoint: {problem}. Use the catalogue's file.")


def _strict_load_problem(load: Callable[[], object]) -> Optional[str]:
    """None when ``load()``, a strict load_state_dict, succeeds; else the start of torch's account of the missing,
    unexpected and misshapen tensors."""
    try:
        load()
    except RuntimeError as error:
        return " ".join(str(error).split())[:400].rstrip(".")
    return None


@contextmanager
def _quietly():
    """Silence what building and loading on the meta device prints: torch's warnings that copying into a meta
    tensor does nothing, and open_clip's log line that no pretrained weights were loaded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)
