"""Every parameter of a CLISC cohort run (recorded in config.json), with its check."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import InputError
from ..models.classifier_builders import CLASSIFIER_ARCHITECTURES
from ..precision import dtype_of

# Options that may differ between a run and its resumption.
RESUMABLE_CHANGES = ("device", "labels", "stop_after", "loader_workers")
STOP_AFTER = ("pseudo_labels",)


@dataclass
class CohortOptions:
    """Every parameter of a cohort run. Defaults follow the paper where it says."""

    clip: str = "clip_vit_b32"              # the paper's OpenAI ViT-B/32
    sam: str = "sam_vit_b"
    classifier: str = "auto"                # resnet50 | efficientnet-lite0 | auto (`classifier_choice`)
    classifier_weights: Optional[str] = "imagenet"  # its ImageNet entry, a catalogue name or a file; None: random
    normal_prompt: Optional[str] = None     # default: derived from the target prompt (slice_labels)
    abnormal_prompt: Optional[str] = None
    clip_threshold: float = 0.6             # a slice is labelled when CLIP's larger probability reaches this
    classifier_epochs: int = 20             # not stated in the paper (StepLR steps every 7 epochs)
    classifier_batch_size: int = 8
    classifier_image_size: int = 224
    cam_threshold: str = "otsu"             # otsu | kmeans: label-free CAM binarisation
    unet_epochs: int = 400
    patch_size: int = 128
    batch_size: int = 2                     # per process under torchrun
    loader_workers: int = 2                 # processes that read cases and cut U-Net patches ahead of training
    s3f_rounds: int = 1
    s3f_keep: float = 0.8
    labels: Optional[str] = None            # evaluation only: folder or CSV of ground-truth labelmaps
    holdout_split: Optional[str] = None     # .txt/.csv of case ids kept out of training, predicted at the end
    device: str = "auto"
    sam_precision: str = "float32"
    sam_batch_size: int = 2
    seed: int = 0
    stop_after: Optional[str] = None        # "pseudo_labels": stop there (resume later to train)

    def check(self) -> None:
        if not 0 < self.s3f_keep <= 1:
            raise InputError(f"--s3f-keep {self.s3f_keep}: use a fraction in (0, 1]")
        if self.s3f_rounds < 0 or self.unet_epochs < 1 or self.classifier_epochs < 1 or self.batch_size < 1:
            raise InputError("--s3f-rounds must be >= 0; --unet-epochs, --classifier-epochs, --batch-size >= 1")
        if self.loader_workers < 0:
            raise InputError(f"--loader-workers {self.loader_workers}: use 0 (read in the training process) or more")
        if self.classifier not in ("auto", *CLASSIFIER_ARCHITECTURES):
            raise InputError(f"--classifier {self.classifier!r}: use auto, {', '.join(CLASSIFIER_ARCHITECTURES)}")
        if self.cam_threshold not in ("otsu", "kmeans"):
            raise InputError(f"CAM threshold {self.cam_threshold!r}: use otsu or kmeans")
        if self.stop_after not in (None, *STOP_AFTER):
            raise InputError(f"--stop-after {self.stop_after!r}: use one of {', '.join(STOP_AFTER)}")
        dtype_of(self.sam_precision, "SAM")
        from .unet import check_patch_size

        check_patch_size(self.patch_size)


IMAGENET_WEIGHTS = {"resnet50": "resnet50_imagenet", "efficientnet-lite0": "efficientnet_lite0"}


def classifier_choice(options: CohortOptions) -> tuple[str, Optional[str]]:
    """(backbone, start weights: a catalogue name, a file or None for random) of a run's slice classifier.

    ``classifier_weights="imagenet"`` is the backbone's ImageNet catalogue entry. ``classifier="auto"`` is the
    architecture of the weights given; with the ImageNet default it is the paper's ResNet-50 when its weights are
    installed, else EfficientNet-Lite0, whose ImageNet weights ship with CLISC: measured on BraTS (README, "Slice
    classifier backbones"), its CAMs and pseudo-labels beat a ResNet-50 that starts from random weights. With
    random weights (None) it is ResNet-50."""
    from ..models.cache import is_installed
    from ..models.catalogue import get_entry

    backbone, weights = options.classifier, options.classifier_weights
    if weights == "imagenet":
        if backbone == "auto":
            backbone = "resnet50" if is_installed(get_entry(IMAGENET_WEIGHTS["resnet50"])) else "efficientnet-lite0"
        return backbone, IMAGENET_WEIGHTS[backbone]
    if backbone == "auto":
        backbone = "resnet50" if weights is None else weights_architecture(weights)
    return backbone, weights


def weights_architecture(spec: str) -> str:
    """The backbone of classifier weights: a catalogue entry's architecture, or read off a file's tensor names."""
    from ..models.catalogue import CATALOGUE
    from ..models.classifier_builders import architecture_of
    from ..models.validate import load_checkpoint

    entry = next((e for e in CATALOGUE if e.name == spec and e.family == "classifier"), None)
    if entry is not None:
        return entry.architecture
    return architecture_of(load_checkpoint(Path(spec))) if Path(spec).is_file() else "resnet50"
