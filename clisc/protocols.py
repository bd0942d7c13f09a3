"""The models the pipelines' stages take, as small structural types: a stage asks only for what it uses.

The engine's own classes satisfy them (named in each docstring); a test passes a small class of its own, or a
tiny real model, through the same parameter.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .prompts import SamPrompt


class SliceScorer(Protocol):
    """CLIP as the slice gate and the saliency stage use it (`clisc.clip_scoring.ClipScorer`).

    Embeddings are L2-normalised float32 of the model's width D; CLIP inputs are (B, 3, S, S), S the model's
    input side.
    """

    def images(self, slices: np.ndarray) -> torch.Tensor:
        """CLIP inputs (B, 3, S, S) of uint8 slices (B, H, W)."""

    def text_embedding(self, texts: Sequence[str]) -> torch.Tensor:
        """One embedding (D,) for a set of texts (their normalised mean)."""

    def prompt_embedding(self, prompt: str) -> torch.Tensor:
        """The embedding (D,) of a prompt's positive ensemble."""

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, D) of CLIP inputs (B, 3, S, S)."""

    def relevance(self, image_embeddings: torch.Tensor, positive: torch.Tensor,
                  negative: torch.Tensor) -> np.ndarray:
        """Probability (B,) in [0, 1] that each image matches ``positive`` (D,) rather than ``negative`` (D,)."""

    def to_slice_grid(self, maps: torch.Tensor, shape: tuple) -> np.ndarray:
        """Maps (B, S, S) on CLIP's input grid back to the slices' pixels: (B, H, W) float32, ``shape`` (H, W)."""


class SaliencyMethod(Protocol):
    """Where CLIP's image-text similarity comes from (`clisc.saliency.ClipSaliency`)."""

    def __call__(self, images: torch.Tensor, text_embeddings: torch.Tensor, beta: float) -> torch.Tensor:
        """Maps (B, S, S) float32 in [0, 1] of CLIP inputs (B, 3, S, S) for text embeddings (1, D) or (B, D).

        ``beta`` is M2IB's information-bottleneck weight from the prompt's profile; other methods ignore it.
        """


class SliceSam(Protocol):
    """Segment Anything on the slices of one size (`clisc.sam.SliceSegmenter`).

    Attributes:
        batch_size: slices per `embed` call the pipeline sends.
        box_prompts_only: the model was trained with boxes alone, so it ignores points given with a box.
    """

    batch_size: int
    box_prompts_only: bool

    def embed(self, images: np.ndarray) -> torch.Tensor:
        """Image embeddings (B, ...) of RGB uint8 slices (B, H, W, 3); `predict` takes one row."""

    def predict(self, embedding: torch.Tensor, image_shape: tuple, prompt: SamPrompt) -> np.ndarray:
        """Mask (H, W) bool of one slice, ``image_shape`` (H, W), from its embedding and prompt (pixel
        coordinates, `clisc.prompts`)."""

    def predict_logits(self, embedding: torch.Tensor, image_shape: tuple, points=None, labels=None, box=None,
                       mask_input=None, multimask=None):
        """One slice's `clisc.sam.SlicePrediction` (mask, SAM's low-resolution logits, predicted IoU) from its
        embedding, points, labels, one box and an earlier prediction's logits: what refinement and the seeded
        mode's propagation use (`clisc.propagation`)."""


class SliceClassifier(Protocol):
    """The cohort's slice classifier (`clisc.cohort.classifier.build_classifier`: an ImageNet CNN), a torch module.

    ``cam_layer`` names the module LayerCAM reads (``model.get_submodule(model.cam_layer)``);
    `load_state_dict`/`state_dict` save it in the run folder.
    """

    cam_layer: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, 2) ("normal", "abnormal") of classifier inputs (B, 3, S, S) (`classifier.to_input`)."""


class SegmentationNetwork(Protocol):
    """The 3D network the cohort self-trains (`clisc.cohort.unet.build_unet`: MONAI's UNet), a torch module."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, 2, K, J, I) (background, foreground) of pre-processed images (B, 1, K, J, I)."""
