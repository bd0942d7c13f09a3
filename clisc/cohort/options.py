"""Every parameter of a CLISC cohort run (recorded in config.json), with its check."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import InputError
from ..precision import dtype_of

# Options that may differ between a run and its resumption.
RESUMABLE_CHANGES = ("device", "labels", "stop_after", "loader_workers")
STOP_AFTER = ("pseudo_labels",)


@dataclass
class CohortOptions:
    """Every parameter of a cohort run. Defaults follow the paper where it says."""

    clip: str = "clip_vit_b32"              # the paper's OpenAI ViT-B/32
    sam: str = "sam_vit_b"
    classifier_weights: Optional[str] = "resnet50_imagenet"  # ImageNet ResNet-50 (name or file); None: random
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
        if self.cam_threshold not in ("otsu", "kmeans"):
            raise InputError(f"CAM threshold {self.cam_threshold!r}: use otsu or kmeans")
        if self.stop_after not in (None, *STOP_AFTER):
            raise InputError(f"--stop-after {self.stop_after!r}: use one of {', '.join(STOP_AFTER)}")
        dtype_of(self.sam_precision, "SAM")
        from .unet import check_patch_size

        check_patch_size(self.patch_size)
