"""Segment Anything on the slices of a volume: batched image embeddings, then masks from box/point prompts.

`SliceSegmenter` owns each model's pre-processing and post-processing, as ``SamPredictor`` does for one image:
SAM and MedSAM take the longest side resized to 1024 px, RGB 0..255 normalised by SAM's mean and std, zero
padding; LiteMedSAM takes the longest side resized to 256 px, the slice min-max scaled to [0, 1], zero padding.
Mask logits go back to the slice grid and are thresholded. Unlike ``SamPredictor`` it embeds many slices
per forward pass, without gradients, with the fused-attention encoder and, where asked, bf16/fp16 autocast;
LiteMedSAM's encoder, and its prompt encoder and mask decoder for a box prompt (`clisc.sam_box_decoder`), can
run in another CPU runtime (`clisc.runtime`: OpenVINO, ONNX Runtime).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .components import largest_components
from .models.sam_builders import box_prompts_only, takes_min_max_input
from .prompts import SamPrompt
from .runtime import choose_runtime, module_forward
from .sam_box_decoder import BoxPromptDecoder
from .sam_speed import accelerate_image_encoder
from .torchvision_compat import import_torchvision

logger = logging.getLogger(__name__)


@dataclass
class SlicePrediction:
    """What `SliceSegmenter.predict_logits` returns for one slice.

    mask: (H, W) bool, the slice-grid logits > 0 (probability 0.5), kept whole (no component filtering).
    low_res_logits: (1, 256, 256) float32 on the CPU (4 × the embedding grid), SAM's low-resolution logits in its
        padded input frame: what ``mask_input`` takes on the next call.
    iou: SAM's own predicted IoU of ``mask`` (its IoU head), 0..1 for a trained model.
    """

    mask: np.ndarray
    low_res_logits: torch.Tensor
    iou: float


class SliceSegmenter:
    """SAM applied to 2D slices of one size.

    Args:
        sam: a `segment_anything.modeling.Sam` (eval mode) on its device.
        autocast_dtype: dtype for the image encoder under autocast (torch.bfloat16 on CPU, torch.float16 or
            bfloat16 on CUDA) or None for full precision. The light prompt encoder and mask decoder always
            run in float32.
        batch_size: slices per encoder forward pass; halved on a CUDA out-of-memory error, and at one slice
            SAM moves to the CPU. 1 when the encoder runs in an exported runtime, which takes one slice at a time
            (`clisc.runtime`): a larger batch would gain nothing there, and propagation would embed slices past
            its stop in vain.
        runtime: where LiteMedSAM's image encoder, and its decoder for a box with or without a mask input, run on
            the CPU (`clisc.runtime.RUNTIMES`); SAM's ViT models always run in PyTorch, their encoders with the
            fused CPU attention (`clisc.sam_speed`).
    """

    def __init__(self, sam, autocast_dtype: Optional[torch.dtype] = None, batch_size: int = 2,
                 runtime: str = "torch") -> None:
        import_torchvision()
        from segment_anything.utils.transforms import ResizeLongestSide

        self.sam = sam
        accelerate_image_encoder(sam)
        self.device = next(sam.parameters()).device
        self.autocast_dtype = autocast_dtype
        self.batch_size = batch_size
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self.min_max_input = takes_min_max_input(sam)
        self.box_prompts_only = box_prompts_only(sam)
        self.runtime = runtime if self.min_max_input else "torch"
        self.exported = choose_runtime(self.runtime, self.device) != "torch"
        if self.exported:
            self.batch_size = 1
        self._encoder = self._box_decoder = None  # their forwards in the runtime, built on first use

    def embed(self, images: np.ndarray) -> torch.Tensor:
        """Image embeddings (B, 256, 64, 64) float32 of RGB uint8 slices (B, H, W, 3), for every model here."""
        batch = torch.stack([self._preprocess(image) for image in images])
        try:
            return self._encode(batch)
        except torch.OutOfMemoryError:
            if self.device.type != "cuda":
                raise
            torch.cuda.empty_cache()
            if self.batch_size > 1:
                self.batch_size //= 2
                logger.warning("GPU out of memory: retrying SAM with %d slice(s) per batch", self.batch_size)
            else:
                logger.warning("GPU out of memory even for one slice: SAM continues on the CPU (slower)")
                self.device = torch.device("cpu")
                self.sam.to(self.device)
                self._encoder = None
            return self.embed(images)

    def _encode(self, batch: torch.Tensor) -> torch.Tensor:
        if self._encoder is None:
            size = self.sam.image_encoder.img_size
            probe = torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(0))  # LiteMedSAM's [0, 1]
            self._encoder = module_forward(self.sam.image_encoder, probe, self.runtime, self.device,
                                           self.autocast_dtype, "sam-encoder")
        outputs = [self._encoder(batch[start:start + self.batch_size])[0].to(self.device)
                   for start in range(0, len(batch), self.batch_size)]
        return torch.cat(outputs)

    def encoder_runtime(self) -> Optional[dict]:
        """What ran the image encoder (`clisc.runtime.forwards`), for the report; None before any slice."""
        return self._encoder.describe() if self._encoder is not None else None

    def decoder_runtime(self) -> Optional[dict]:
        """What ran the decoder for box prompts in the runtime, for the report; None where it has not run."""
        return self._box_decoder.describe() if self._box_decoder is not None else None

    def _preprocess(self, image: np.ndarray) -> torch.Tensor:
        resized = torch.as_tensor(self.transform.apply_image(image)).permute(2, 0, 1).contiguous()
        resized = resized.to(self.device).float()
        if self.min_max_input:  # LiteMedSAM: the resized slice scaled to [0, 1], as its authors' inference does
            low, high = resized.min(), resized.max()
            resized = (resized - low) / (high - low).clamp(min=1e-8)
        return self.sam.preprocess(resized)

    def predict(self, embedding: torch.Tensor, image_shape: tuple, prompt: SamPrompt) -> np.ndarray:
        """Mask (H, W) bool of one slice from its embedding (256, 64, 64): single-mask output, logits > 0
        (probability 0.5), union over boxes, then the ``prompt.components`` largest blobs. A model trained
        with boxes only (LiteMedSAM) gets the box alone when a prompt has both box and points."""
        sam = self.sam
        points = boxes = None
        if prompt.points is not None and not (self.box_prompts_only and prompt.boxes is not None):
            coords = self.transform.apply_coords(prompt.points, image_shape)
            points = (torch.as_tensor(coords, dtype=torch.float, device=self.device)[None],
                      torch.as_tensor(prompt.labels, dtype=torch.int, device=self.device)[None])
        if prompt.boxes is not None:
            boxes = torch.as_tensor(self.transform.apply_boxes(prompt.boxes, image_shape),
                                    dtype=torch.float, device=self.device)
            if points is not None:
                points = tuple(p.expand(len(boxes), *p.shape[1:]) for p in points)
        with torch.inference_mode():
            sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
            low_res, _ = sam.mask_decoder(
                image_embeddings=embedding[None].to(self.device), image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
            input_size = self.transform.get_preprocess_shape(*image_shape, self.transform.target_length)
            logits = sam.postprocess_masks(low_res, input_size, image_shape)
        mask = (logits > sam.mask_threshold).any(dim=0)[0].cpu().numpy()
        return largest_components(mask, prompt.components)

    def predict_logits(self, embedding: torch.Tensor, image_shape: tuple, points: Optional[np.ndarray] = None,
                       labels: Optional[np.ndarray] = None, box: Optional[np.ndarray] = None,
                       mask_input: Optional[torch.Tensor] = None, multimask: Optional[bool] = None) -> SlicePrediction:
        """One slice's mask with SAM's logits and predicted IoU, for interactive refinement.

        Args:
            embedding: (256, 64, 64) from `embed`.
            image_shape: (H, W) of the slice.
            points: (P, 2) float, (x, y) = (column, row) in slice pixels; labels (P,) int, 1 positive, 0 negative.
                Sent as given, also to a box-trained model (the caller decides; see ``box_prompts_only``).
            box: (4,) float, x0, y0, x1, y1 in slice pixels (inclusive bounds).
            mask_input: (1, 256, 256) low-resolution logits of an earlier prediction (`SlicePrediction`) or of
                `mask_to_logits`, or None.
            multimask: SAM's three-mask output, keeping the one with the highest predicted IoU. Default: only
                for a single point with no box and no mask input, where SAM's authors recommend it (an
                ambiguous prompt).
        """
        sam = self.sam
        if points is not None and len(points) == 0:
            points = labels = None
        if multimask is None:
            multimask = points is not None and len(points) == 1 and box is None and mask_input is None
        point_input = box_input = mask_tensor = None
        if points is not None:
            coords = self.transform.apply_coords(np.asarray(points, dtype=float), image_shape)
            point_input = (torch.as_tensor(coords, dtype=torch.float, device=self.device)[None],
                           torch.as_tensor(np.asarray(labels), dtype=torch.int, device=self.device)[None])
        if box is not None:
            box_input = torch.as_tensor(self.transform.apply_boxes(np.asarray(box, dtype=float)[None], image_shape),
                                        dtype=torch.float, device=self.device)
        if mask_input is not None:
            mask_tensor = mask_input.to(self.device, torch.float)[None]
        with torch.inference_mode():
            if self.exported and point_input is None and box_input is not None and not multimask:
                low_res, iou = self._decode_box(embedding, box_input, mask_tensor)
            else:
                sparse, dense = sam.prompt_encoder(points=point_input, boxes=box_input, masks=mask_tensor)
                low_res, iou = sam.mask_decoder(
                    image_embeddings=embedding[None].to(self.device), image_pe=sam.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask)
            best = int(iou[0].argmax())
            low_res = low_res[:, best:best + 1]
            input_size = self.transform.get_preprocess_shape(*image_shape, self.transform.target_length)
            logits = sam.postprocess_masks(low_res, input_size, image_shape)
        mask = (logits[0, 0] > sam.mask_threshold).cpu().numpy()
        return SlicePrediction(mask, low_res[0].float().cpu(), float(iou[0, best]))

    def _decode_box(self, embedding: torch.Tensor, box: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple:
        """`BoxPromptDecoder` in the runtime: (1, 1, 256, 256) logits and (1, 1) IoU for a box (1, 4) in the
        model's input pixels and a mask input (1, 1, 256, 256) or None."""
        if self._box_decoder is None:
            self._box_decoder = module_forward(BoxPromptDecoder(self.sam), BoxPromptDecoder.probe(), self.runtime,
                                               self.device, None, "sam-box-decoder")
        has_mask = torch.ones(1) if mask is not None else torch.zeros(1)
        mask = mask if mask is not None else torch.zeros(1, 1, *self.sam.prompt_encoder.mask_input_size)
        return self._box_decoder(embedding[None], box, mask, has_mask)

    def mask_to_logits(self, mask: np.ndarray, magnitude: float = 8.0) -> torch.Tensor:
        """(1, 256, 256) (4 × the embedding grid) mask input from a slice mask (H, W) bool that SAM did not draw
        (a U-Net's, the user's): resized as the image is (longest side to the model's input size), zero padded,
        brought to the low-resolution grid, +``magnitude`` inside and -``magnitude`` outside (SAM's logits
        saturate there)."""
        import torch.nn.functional as F

        height, width = mask.shape
        new_h, new_w = self.transform.get_preprocess_shape(height, width, self.transform.target_length)
        size = self.sam.image_encoder.img_size
        resized = F.interpolate(torch.as_tensor(mask, dtype=torch.float)[None, None], (new_h, new_w), mode="bilinear",
                                align_corners=False)
        padded = F.pad(resized, (0, size - new_w, 0, size - new_h))
        low = self.sam.prompt_encoder.mask_input_size
        low_res = F.interpolate(padded, low, mode="bilinear", align_corners=False)[0]
        return (low_res * 2 - 1) * magnitude
