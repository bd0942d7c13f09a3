"""Accuracy of CLISC's SAM stages with the real pretrained LiteMedSAM, on every ground-truth set of ../shared/data.

Each row replaces some stages by ground truth (an "oracle") and runs the rest with the engine's own code:

(a) SAM ceiling. Oracle: the bounding box of the ground truth on every slice that holds the target (one box
    around all of the slice's target pixels; tight, and grown by 5 and 10 px, clipped to the slice); SAM's
    mask is kept whole. Shows the best a box prompt can get from this SAM on these images and what loose
    boxes cost. Cannot show anything about saliency, CAMs or slice selection (a slice without target gets no
    box, so slice selection is perfect; a normal BUSI image scores 1 trivially). Measured on each image view
    a later row gives SAM: "zeroshot" (`clisc.zeroshot.percentile_window_uint8` of the volume, as
    `ZeroShotSegmenter` feeds SAM), "clisc" (the cohort's pre-processing: body crop, clip, z-score, per-slice
    min-max truncated to uint8, then `pseudo_labels.sam_image`, as `sam_pseudo_label` feeds SAM) and, for CT,
    "ct-window" (soft-tissue window, level 40 HU, width 400 HU, 3 equal channels).
(b) Zero-shot pipeline from the coarse mask on. Oracles: the saliency map, made from the ground truth with
    the perturbations below, and slice selection (a volume's slices without target get a flat map, so only
    ground-truth slices reach SAM; CLIP relevance is not tested). Every BUSI image gets a map (a normal one:
    only noise and blobs), so normal images measure false positives. Everything after the map is
    `ZeroShotSegmenter.segment` itself, given only its saliency method (`GivenSaliency`): `coarse_mask`,
    `sam_prompt` with the preset's settings, `SliceSegmenter.predict`, the largest 3D components. Shows how
    the mask -> prompt -> SAM chain tolerates a blurred, shifted, noisy, blob-ridden saliency; cannot show how
    good a real CLIP saliency is (no pretrained CLIP here). Variants: blur only; the engine's points mode.
(c) CLISC pseudo-labels. Oracles: the classifier's slice decisions (ground-truth slices; every BUSI image)
    and the LayerCAM map, made from the ground truth the same way (another random stream). After the map
    everything is the engine's: `postprocess_cams` (label-free Otsu threshold inside the body, 3D opening,
    small components dropped), `sam_pseudo_label` with its defaults (box + 10 px, 5 positive points, 4
    negative box corners; checked at start), kept inside the body as `CohortRun` keeps it. A one-slice image
    (BUSI) goes to `postprocess_cams` as 3 equal slices and the middle one is kept: on a single slice the 3D
    opening erases everything. With --patches, LOCAL PATCHES of the engine (in this script only) show what
    sending the 9 points to LiteMedSAM beside the box (as the engine did before commit 937121c; it now sends
    a box-trained SAM the box alone), skimage's histogram equalisation (the engine's before METHOD.md's
    OpenCV rule), and no equalisation give.
(d) Whole CLISC cohort run (`clisc train`, SAM litemedsam) on the 4 BraTS volumes. Oracle: CLIP's slice
    labels only, replaced by ground-truth ones (1 where the pre-processed slice holds tumour, else 0) written
    as RUN/slice_labels/CASE.json before the run starts: the run skips every case whose output exists (the
    documented resume behaviour), so CLIP is never called. Handicaps that are not oracles: CLIP is a random
    ViT-B-32 (unused); the slice classifier is --classifier from --classifier-weights (default: ResNet-50 from
    random weights, as no ImageNet ResNet-50 exists here; "--classifier efficientnet-lite0 --classifier-weights
    imagenet": EfficientNet-Lite0 from the ImageNet weights that ship with CLISC); training is short (see
    --classifier-epochs, --unet-epochs, --patch-size). --holdout pat0004,... keeps those volumes out of every
    stage (`clisc train --holdout-split`): only the final U-Net predicts them, scored apart ("held out"). Shows
    that the whole pipeline runs with a real SAM and what its CAMs, pseudo-labels and U-Net give under these
    handicaps, with the classifier's slice accuracy (its gate against the ground-truth slice labels); cannot show
    the paper's accuracy.

Perturbed maps (b, c), per slice, from the ground-truth mask M (seeded by --seed, the dataset, case, slice):
M shifted by 0.15 D in a random direction (D = equivalent diameter sqrt(4 area / pi) px; 0.1 x the shorter
image side for an empty M), Gaussian blur sigma 4 px, plus 2 spurious Gaussian blobs (peak uniform in
[0.5, 1.0], sigma 0.3 D, centres uniform over the image's non-background pixels), plus white Gaussian noise
(sd 0.1), clipped at 0 and min-max scaled to [0, 1]. "blur only": the blurred M alone.

Metrics per case (`clisc.metrics.evaluate`): a BraTS volume, a BUSI image, a CT organ. Dice, HD95 and NSD at
2 mm, empty cases by `EMPTY_CASE_RULE`; FP counts empty-truth cases with a non-empty prediction. BUSI PNGs
have no spacing: HD95 in pixels, NSD at 2 px, scored as 2D arrays (scoring a one-slice volume in 3D treats
every mask pixel as surface). "map Dice": Dice of the mask SAM is prompted from (b: the engine's coarse mask;
c: the engine's CAM mask), so SAM's gain over its prompt is visible. Seconds per slice: "embed" is the mean time of one encoder pass in the view the
row uses (each distinct slice image is embedded once and reused by every row); "decode" is the row's prompt
encoder + mask decoder + post-processing time per prompted slice.

Speed (row "speed"): LiteMedSAM and a full-size random-weight SAM vit_b encoder, fp32 and bf16, on a few
BraTS slices; a whole BraTS volume through `ZeroShotSegmenter` (preset fast, slices auto, SAM litemedsam,
random full-size CLIP ViT-B-16: accuracy meaningless, timing real), stage by stage.

    python scripts/bench_accuracy.py [--rows a,b,c,speed] [--datasets brats,busi,ct] [--patches] [--json OUT]
    python scripts/bench_accuracy.py --rows d [--classifier-epochs 2 --unet-epochs 200 --patch-size 96] [--json OUT]
    python scripts/bench_accuracy.py --rows d --classifier efficientnet-lite0 --classifier-weights imagenet \
        --holdout pat0004 [...]
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
from scipy import ndimage

from clisc.cohort import pseudo_labels
from clisc.cohort.cases import body_mask, minmax_slices, preprocess, to_uint8_slices, uncrop
from clisc.cohort.classifier import postprocess_cams
from clisc.cohort.options import CohortOptions
from clisc.metrics import EMPTY_CASE_RULE, NSD_TOLERANCE_MM, evaluate
from clisc.models.loaders import load_clip, load_sam
from clisc.models.random_weights import save_random_clip, save_random_sam
from clisc.prompts import SamPrompt, coarse_mask
from clisc.readers import read_volume
from clisc.sam import SliceSegmenter
from clisc.volume import Volume
from clisc.zeroshot import ZeroShotSegmenter, percentile_window_uint8, preset_options, prompt_profile, slice_axis

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = ("brats", "busi", "ct")
ROWS = ("a", "b", "c", "d", "speed")
CT_ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "aorta")
CT_WINDOW_HU = (40.0, 400.0)  # level, width
BOX_DILATIONS = (0, 5, 10)
DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


@dataclass
class Perturbation:
    """How a ground-truth mask becomes a saliency/CAM-like map (see the module docstring)."""

    shift: float = 0.15        # centre shift, fraction of the equivalent diameter D
    blur_px: float = 4.0       # Gaussian sigma
    blobs: int = 2             # spurious blobs
    blob_peak: tuple = (0.5, 1.0)
    blob_sigma: float = 0.3    # fraction of D
    noise_sd: float = 0.1


BLUR_ONLY = Perturbation(shift=0.0, blobs=0, noise_sd=0.0)


@dataclass
class Case:
    """One scored target: ``truth`` (K, J, I) bool on ``volume``'s grid; ``spacing`` (k, j, i) mm."""

    dataset: str
    name: str
    volume: Volume
    truth: np.ndarray
    prompt: str

    @property
    def spacing(self) -> np.ndarray:
        return self.volume.spacing[::-1]

    @property
    def single_slice(self) -> bool:
        return self.volume.array.shape[0] == 1


# ---- data ---------------------------------------------------------------------------------------------------

def brats_cases() -> List[Case]:
    """The BraTS FLAIR volumes (155, 240, 240), whole tumour = label > 0."""
    return [Case("brats", folder.name, read_volume(folder / "flair.nii.gz"),
                 read_volume(folder / "label.nii.gz").array > 0, "brain tumor")
            for folder in sorted((DATA / "brats2015").glob("pat*"))]


def busi_cases() -> List[Case]:
    """The 20 BUSI images as (1, H, W) grey volumes; lesion = union of NAME_mask*.png (empty for normal)."""
    cases = []
    for image in sorted((DATA / "busi").glob("*/*.png")):
        if "_mask" in image.name:
            continue
        masks = [read_volume(path).array > 0 for path in sorted(image.parent.glob(image.stem + "_mask*.png"))]
        cases.append(Case("busi", image.stem.replace(" ", ""), read_volume(image), np.logical_or.reduce(masks),
                          "breast tumor"))
    return cases


def on_image_grid(labels: Volume, image: Volume) -> np.ndarray:
    """``labels.array`` moved onto ``image``'s grid when the two grids have the same voxel centres in another
    axis order or direction (a signed permutation of the indices); ValueError otherwise (no interpolation)."""
    index_map = np.linalg.inv(image.ijk_to_ras) @ labels.ijk_to_ras  # label ijk -> image ijk
    linear, offset = np.round(index_map[:3, :3]), np.round(index_map[:3, 3])
    if not np.allclose(index_map[:3], np.c_[linear, offset], atol=1e-3) or sorted(np.abs(linear).sum(0)) != [1, 1, 1]:
        raise ValueError("label grid is not a permutation/flip of the image grid")
    array = labels.array
    for axis_ijk in range(3):  # flip every label axis that runs backwards in the image
        image_axis = int(np.argmax(np.abs(linear[:, axis_ijk])))
        flipped = linear[image_axis, axis_ijk] < 0
        if offset[image_axis] != (array.shape[2 - axis_ijk] - 1 if flipped else 0):
            raise ValueError("label grid is offset from the image grid")
        if flipped:
            array = np.flip(array, axis=2 - axis_ijk)
    order = [2 - int(np.argmax(np.abs(linear[2 - axis]))) for axis in range(3)]  # image (k,j,i) <- label axis
    array = np.transpose(array, order)
    if array.shape != image.array.shape:
        raise ValueError(f"label extent {array.shape} differs from the image's {image.array.shape}")
    return np.ascontiguousarray(array)


def ct_cases(report: dict) -> List[Case]:
    """The 20-slice CT (512 x 512 x 20, read from its DICOM series) and one case per organ of `CT_ORGANS`
    present in reference_seg.nii.gz; writes what was checked about the grids into ``report``."""
    folder = DATA / "ct_dicom"
    image, labels = read_volume(folder / "series"), read_volume(folder / "reference_seg.nii.gz")
    names = {name: int(value) for value, name in json.loads((folder / "labels_total.json").read_text())["total"].items()}
    same = labels.array.shape == image.array.shape and np.allclose(labels.ijk_to_ras, image.ijk_to_ras, atol=1e-3)
    aligned = labels.array if same else on_image_grid(labels, image)
    report["grid"] = ("same grid" if same else "same voxel centres, different index order/direction: moved onto "
                      f"the CT grid (label ijk -> CT ijk {np.round(np.linalg.inv(image.ijk_to_ras) @ labels.ijk_to_ras, 3).tolist()})")
    report["hu_mean_in_liver"] = {"as stored": float(image.array[labels.array == names["liver"]].mean()),
                                  "moved onto the CT grid": float(image.array[aligned == names["liver"]].mean())}
    report["absent_organs"] = [organ for organ in CT_ORGANS if not (aligned == names[organ]).any()]
    return [Case("ct", organ, image, aligned == names[organ], organ.replace("_", " "))
            for organ in CT_ORGANS if organ not in report["absent_organs"]]


# ---- image views: what SAM sees --------------------------------------------------------------------------------

@dataclass
class View:
    """The slices SAM sees under one pre-processing.

    ``images`` (N, H, W, 3) uint8 RGB as given to `SliceSegmenter.embed`; ``truth`` (N, H, W) bool on the same
    grid; ``to_volume`` maps an (N, H, W) bool result back to the case's (K, J, I) grid.
    """

    name: str
    images: np.ndarray
    truth: np.ndarray
    to_volume: Callable[[np.ndarray], np.ndarray]
    body: Optional[np.ndarray] = None  # (N, H, W) bool, cohort view only
    slices_uint8: Optional[np.ndarray] = None  # (N, H, W) uint8 before equalisation, cohort view only


def zeroshot_view(case: Case) -> View:
    """Slices as `ZeroShotSegmenter.segment` makes them: `percentile_window_uint8` of the volume along the slice
    axis."""
    axis = slice_axis(case.volume, "auto")
    slices = np.moveaxis(percentile_window_uint8(case.volume.array), axis, 0)
    return View("zeroshot", np.repeat(slices[..., None], 3, axis=-1), np.moveaxis(case.truth, axis, 0),
                lambda mask: np.moveaxis(mask, 0, axis))


def cohort_view(case: Case) -> View:
    """Slices as the cohort run gives them to `sam_pseudo_label`: `preprocess` (body crop, clip, z-score),
    `minmax_slices`, `sam_image` (truncated to uint8, equalised); axial (K) slices of the cropped grid."""
    image, crop = preprocess(case.volume)
    slices = to_uint8_slices(image)
    sam_images = np.stack([pseudo_labels.sam_image(s) for s in minmax_slices(image, np.float64)])
    return View("clisc", sam_images, case.truth[crop],
                lambda mask: uncrop(mask, crop, case.truth.shape), body_mask(case.volume.array)[crop], slices)


def ct_window_view(case: Case) -> View:
    """CT axial slices in a soft-tissue window (`CT_WINDOW_HU`) to uint8, 3 equal channels."""
    level, width = CT_WINDOW_HU
    scaled = np.clip((case.volume.array.astype(np.float32) - level + width / 2) / width, 0, 1)
    slices = (scaled * 255).round().astype(np.uint8)
    return View("ct-window", np.repeat(slices[..., None], 3, axis=-1), case.truth, lambda mask: mask)


class EmbeddingCache(SliceSegmenter):
    """`SliceSegmenter` that embeds each distinct slice image once and times its two halves.

    ``embed`` returns stored embeddings for images seen before (keyed by their bytes); ``encode_seconds`` and
    ``encoded`` count encoder time and slices per ``tag`` (the view being embedded); ``decode_seconds`` and
    ``decoded`` count `predict` calls since `reset_decode`.
    """

    def __init__(self, sam, autocast_dtype: Optional[torch.dtype], batch_size: int) -> None:
        super().__init__(sam, autocast_dtype, batch_size)
        self.store: Dict[bytes, torch.Tensor] = {}
        self.tag = "?"
        self.encode_seconds: Dict[str, float] = {}
        self.encoded: Dict[str, int] = {}
        self.reset_decode()

    def embed(self, images: np.ndarray) -> torch.Tensor:
        """(B, 256, 64, 64) float32 embeddings of (B, H, W, 3) uint8 images."""
        keys = [hashlib.blake2b(image.tobytes() + bytes(str(image.shape), "ascii"), digest_size=16).digest()
                for image in images]
        missing = [n for n, key in enumerate(keys) if key not in self.store]
        for start in range(0, len(missing), 8):
            chunk = missing[start:start + 8]
            started = time.perf_counter()
            embeddings = super().embed(images[chunk])
            self.encode_seconds[self.tag] = self.encode_seconds.get(self.tag, 0.0) + time.perf_counter() - started
            self.encoded[self.tag] = self.encoded.get(self.tag, 0) + len(chunk)
            self.store.update(zip((keys[n] for n in chunk), embeddings))
        return torch.stack([self.store[key] for key in keys])

    def predict(self, embedding: torch.Tensor, image_shape: tuple, prompt: SamPrompt) -> np.ndarray:
        started = time.perf_counter()
        mask = super().predict(embedding, image_shape, prompt)
        self.decode_seconds += time.perf_counter() - started
        self.decoded += 1
        return mask

    def reset_encode(self) -> None:
        self.encode_seconds.clear()
        self.encoded.clear()

    def reset_decode(self) -> None:
        self.decode_seconds, self.decoded = 0.0, 0

    def precompute(self, view: View, indices: np.ndarray) -> None:
        """Embed the slices ``indices`` of ``view`` (timed under the view's name)."""
        self.tag = view.name
        if len(indices):
            self.embed(view.images[indices])

    def seconds_per_slice(self, tag: str) -> Optional[float]:
        return self.encode_seconds[tag] / self.encoded[tag] if self.encoded.get(tag) else None


# ---- maps made from the ground truth -----------------------------------------------------------------------------

def perturbed_map(mask: np.ndarray, region: np.ndarray, rng: np.random.Generator,
                  how: Perturbation = Perturbation()) -> np.ndarray:
    """A saliency/CAM-like map (H, W) float32 in [0, 1] from a ground-truth mask (H, W) bool; spurious blobs
    are centred on pixels of ``region`` (H, W) bool (the image's non-background)."""
    height, width = mask.shape
    area = int(mask.sum())
    diameter = np.sqrt(4 * area / np.pi) if area else 0.1 * min(height, width)
    angle = rng.uniform(0, 2 * np.pi)
    shifted = ndimage.shift(mask.astype(np.float32), (how.shift * diameter * np.sin(angle),
                                                      how.shift * diameter * np.cos(angle)), order=0)
    result = ndimage.gaussian_filter(shifted, how.blur_px)
    rows, cols = np.mgrid[:height, :width]
    candidates = np.argwhere(region) if region.any() else np.argwhere(np.ones_like(region))
    for _ in range(how.blobs):
        centre_row, centre_col = candidates[rng.integers(len(candidates))]
        sigma = how.blob_sigma * diameter
        result += rng.uniform(*how.blob_peak) * np.exp(-((rows - centre_row) ** 2 + (cols - centre_col) ** 2)
                                                         / (2 * sigma ** 2))
    if how.noise_sd:
        result += rng.normal(0, how.noise_sd, result.shape)
    result = np.clip(result, 0, None)
    span = np.ptp(result)
    return ((result - result.min()) / span if span > 0 else np.zeros_like(result)).astype(np.float32)


def perturbed_maps(case: Case, view: View, stream: int, seed: int, how: Perturbation) -> np.ndarray:
    """(N, H, W) float32 maps on ``view``'s slices: perturbed ground truth on the slices that reach the map
    stage (ground-truth slices; every slice of a one-slice image), 0 elsewhere. ``stream`` separates the
    random numbers of row b (1) and row c (2)."""
    maps = np.zeros(view.truth.shape, np.float32)
    grey = view.images[..., 0]
    for index in selected_slices(case, view):
        region = grey[index] > grey[index].min()
        rng = np.random.default_rng([seed, stream, zlib.crc32(f"{case.dataset}/{case.name}".encode()), int(index)])
        maps[index] = perturbed_map(view.truth[index], region, rng, how)
    return maps


def selected_slices(case: Case, view: View) -> np.ndarray:
    """The slices the oracle lets through: those holding the target, or all of a one-slice image."""
    return np.arange(len(view.truth)) if case.single_slice else np.flatnonzero(view.truth.any(axis=(1, 2)))


# ---- rows ------------------------------------------------------------------------------------------------------

def box_prompt(mask: np.ndarray, dilation: int) -> SamPrompt:
    """SAM box prompt (inclusive pixel bounds, `clisc.prompts` convention) around a non-empty mask (H, W),
    grown by ``dilation`` px and clipped to the slice; SAM's mask is kept whole."""
    rows, cols = np.nonzero(mask)
    height, width = mask.shape
    box = [max(cols.min() - dilation, 0), max(rows.min() - dilation, 0),
           min(cols.max() + dilation, width - 1), min(rows.max() + dilation, height - 1)]
    return SamPrompt(np.array([box], dtype=float), None, None, components=mask.size)


def row_a(view: View, segmenter: EmbeddingCache, dilation: int) -> np.ndarray:
    """(K, J, I) bool: SAM on every ground-truth slice of ``view`` prompted by its ground-truth box."""
    prediction = np.zeros(view.truth.shape, dtype=bool)
    for index in np.flatnonzero(view.truth.any(axis=(1, 2))):
        embedding = segmenter.embed(view.images[index][None])[0]
        prediction[index] = segmenter.predict(embedding, view.truth.shape[1:], box_prompt(view.truth[index], dilation))
    return view.to_volume(prediction)


class SliceImages:
    """The part of a `clisc.protocols.SliceScorer` the pipeline uses with ``slices="all"``: CLIP's input is the
    slice itself, (B, 3, H, W) uint8, and a map comes back unchanged, so a given map reaches `coarse_mask` as it
    is."""

    def images(self, slices: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(slices)[:, None].expand(-1, 3, -1, -1)

    def prompt_embedding(self, prompt: str) -> torch.Tensor:
        return torch.zeros(1)

    def to_slice_grid(self, maps: torch.Tensor, shape: tuple) -> np.ndarray:
        return maps.numpy()


class GivenSaliency:
    """A `clisc.protocols.SaliencyMethod` returning given maps instead of CLIP's: ``maps`` (N, H, W) on the
    pipeline's slices ``slices`` (N, H, W) uint8, each found by its slice's pixels (`SliceImages` passes them
    through; only slices with contrast reach it, and those differ)."""

    def __init__(self, slices: np.ndarray, maps: np.ndarray) -> None:
        self.maps = {plane.tobytes(): saliency for plane, saliency in zip(slices, maps)}

    def __call__(self, images: torch.Tensor, text_embeddings: torch.Tensor, beta: float) -> torch.Tensor:
        return torch.stack([torch.as_tensor(self.maps[image[0].numpy().tobytes()]) for image in images])


def row_b(case: Case, view: View, options, maps: np.ndarray, segmenter: EmbeddingCache) -> np.ndarray:
    """(K, J, I) bool: the zero-shot pipeline on ``case`` with the saliency ``maps`` (N, H, W) on ``view``'s
    slices; every other stage is the engine's, SAM the shared `EmbeddingCache`."""
    segmenter.tag = view.name
    pipeline = ZeroShotSegmenter(options, scorer=SliceImages(), slice_sam=segmenter,
                                 saliency=GivenSaliency(view.images[..., 0], maps))
    return pipeline.segment(case.volume, [case.prompt]).masks[0]


def coarse_masks(maps: np.ndarray, options, case: Case) -> np.ndarray:
    """(N, H, W) bool: the engine's `coarse_mask` of each map (N, H, W) with the settings of ``options`` and the
    case's prompt profile, as `ZeroShotSegmenter.segment` computes it before prompting SAM (a flat map gives an
    empty mask)."""
    profile, _ = prompt_profile(options, case.prompt, case.single_slice)
    return np.stack([coarse_mask(m, options.coarse_method, profile.components) for m in maps])


def cam_masks(case: Case, view: View, seed: int, how: Perturbation) -> np.ndarray:
    """(N, H, W) bool: the engine's `postprocess_cams` of perturbed ground-truth CAMs on the cohort view (a
    one-slice image as 3 equal slices, the middle one kept)."""
    cams = perturbed_maps(case, view, 2, seed, how)
    positive = np.zeros(len(cams), dtype=bool)
    positive[selected_slices(case, view)] = True
    method = CohortOptions().cam_threshold
    if case.single_slice:
        three = lambda array: np.repeat(array, 3, axis=0)  # noqa: E731
        return postprocess_cams(three(cams), three(view.body), three(positive), method=method)[1:2]
    return postprocess_cams(cams, view.body, positive, method=method)


def row_c(view: View, masks: np.ndarray, segmenter: EmbeddingCache) -> np.ndarray:
    """(K, J, I) bool: `sam_pseudo_label` with its defaults on the cohort view, kept inside the body."""
    segmenter.tag = view.name
    return view.to_volume(pseudo_labels.sam_pseudo_label(segmenter, view.slices_uint8, masks) & view.body)


def check_pseudo_label_defaults() -> str:
    """What `sam_pseudo_label` uses by default; AssertionError if it is not box + 10 px, 5 + 4 points."""
    dilation = inspect.signature(pseudo_labels.sam_pseudo_label).parameters["box_dilation"].default
    mask = np.zeros((64, 64), bool)
    mask[20:40, 25:45] = True
    prompt = pseudo_labels.slice_prompt(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64), mask)
    positives, negatives = int((prompt.labels == 1).sum()), int((prompt.labels == 0).sum())
    assert (dilation, positives, negatives, len(prompt.boxes)) == (10, 5, 4, 1), (dilation, positives, negatives)
    return f"sam_pseudo_label defaults: box_dilation={dilation}, {positives} positive + {negatives} negative points, 1 box"


# ---- LOCAL PATCHES of the engine (row c --patches); the engine itself is not changed ---------------------------

@contextlib.contextmanager
def patched(module, name: str, replacement) -> Iterator[None]:
    """``module.name`` replaced by ``replacement`` for the duration."""
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def skimage_equalised_rgb(slice_uint8: np.ndarray) -> np.ndarray:
    """LOCAL PATCH: `equalised_rgb` as the engine did before METHOD.md's rule, with skimage's equalize_hist
    (the lowest grey level maps to its CDF value, the background to about 61)."""
    from skimage import exposure

    image = slice_uint8
    if np.ptp(slice_uint8) > 0:
        image = (exposure.equalize_hist(slice_uint8, nbins=256) * 255).round().astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=-1)


def plain_rgb(slice_uint8: np.ndarray) -> np.ndarray:
    """LOCAL PATCH: `equalised_rgb` without equalisation: the slice (H, W) uint8 in three channels."""
    return np.repeat(slice_uint8[..., None], 3, axis=-1)


def local_patches(segmenter: SliceSegmenter) -> Dict[str, contextlib.AbstractContextManager]:
    """The LOCAL PATCHES row c is also run with, by name (fresh context managers: use each once). A name with
    "equalisation" changes the images SAM sees."""
    return {"points sent with the box (engine < 937121c)": patched(segmenter, "box_prompts_only", False),
            "skimage equalisation (engine before the METHOD.md rule)": patched(pseudo_labels, "equalised_rgb",
                                                                                skimage_equalised_rgb),
            "no equalisation": patched(pseudo_labels, "equalised_rgb", plain_rgb)}


# ---- scoring and printing ----------------------------------------------------------------------------------------

def score(prediction: np.ndarray, case: Case) -> dict:
    """`evaluate` of one case; a one-slice image as a 2D array (pixel units)."""
    if case.single_slice:
        return evaluate(prediction[0], case.truth[0], case.spacing[1:])
    return evaluate(prediction, case.truth, case.spacing)


@dataclass
class Row:
    """Scores of one row on one dataset, with its timing."""

    label: str
    oracle: str
    view: str
    cases: Dict[str, dict] = field(default_factory=dict)
    decode_seconds: float = 0.0
    decoded: int = 0

    def summary(self, embed_seconds: Optional[float]) -> dict:
        scores = list(self.cases.values())
        dice = [s["dice"] for s in scores]
        hd95 = [s["hd95_mm"] for s in scores]
        return {"row": self.label, "oracle": self.oracle, "view": self.view, "n": len(scores),
                "dice_mean": float(np.mean(dice)), "dice_median": float(np.median(dice)),
                "hd95_mean": float(np.mean(hd95)), "hd95_median": float(np.median(hd95)),
                "nsd_mean": float(np.mean([s["nsd"] for s in scores])),
                "map_dice_mean": float(np.mean([s["map_dice"] for s in scores])) if "map_dice" in scores[0] else None,
                "false_positives": sum(s["truth_voxels"] == 0 and s["predicted_voxels"] > 0 for s in scores),
                "embed_s_per_slice": embed_seconds,
                "decode_s_per_slice": self.decode_seconds / self.decoded if self.decoded else None,
                "cases": self.cases}


def print_table(title: str, summaries: List[dict], unit: str) -> None:
    print(f"\n{title}")
    print(f"  {'row':<58} {'n':>3} {'Dice mean':>9} {'median':>7} {'HD95 ' + unit + ' mean':>13} {'median':>7} "
          f"{'NSD':>6} {'FP':>3} {'map Dice':>8} {'embed s/sl':>10} {'decode s/sl':>11}")
    for s in summaries:
        embed = f"{s['embed_s_per_slice']:.2f}" if s["embed_s_per_slice"] is not None else "-"
        decode = f"{s['decode_s_per_slice']:.3f}" if s["decode_s_per_slice"] is not None else "-"
        map_dice = f"{s['map_dice_mean']:.3f}" if s["map_dice_mean"] is not None else "-"
        print(f"  {s['row']:<58} {s['n']:>3} {s['dice_mean']:>9.3f} {s['dice_median']:>7.3f} {s['hd95_mean']:>13.1f} "
              f"{s['hd95_median']:>7.1f} {s['nsd_mean']:>6.3f} {s['false_positives']:>3} {map_dice:>8} {embed:>10} {decode:>11}")


# ---- rows a, b, c on one dataset --------------------------------------------------------------------------------

def run_dataset(cases: List[Case], segmenter: EmbeddingCache, rows: List[str], args: argparse.Namespace) -> List[dict]:
    """Rows a/b/c (and the local patches) on every case; returns one summary per row."""
    table: Dict[str, Row] = {}
    volume_id = None
    segmenter.reset_encode()

    def record(label: str, oracle: str, view: str, case: Case, prediction: np.ndarray,
               map_mask: Optional[np.ndarray] = None) -> None:
        row = table.setdefault(label, Row(label, oracle, view))
        row.cases[case.name] = score(prediction, case)
        if map_mask is not None:  # the mask SAM was prompted from (coarse mask, CAM mask), on the case's grid
            row.cases[case.name]["map_dice"] = score(map_mask, case)["dice"]
        row.decode_seconds += segmenter.decode_seconds
        row.decoded += segmenter.decoded
        segmenter.reset_decode()

    for case in cases:
        if id(case.volume) != volume_id:  # embeddings are kept for the cases of one volume (CT organs)
            segmenter.store.clear()
            volume_id = id(case.volume)
        started = time.perf_counter()
        zeroshot, cohort = zeroshot_view(case), cohort_view(case)
        views = [zeroshot, cohort] + ([ct_window_view(case)] if case.dataset == "ct" else [])
        for view in views if "a" in rows else []:
            segmenter.precompute(view, np.flatnonzero(view.truth.any(axis=(1, 2))))
            segmenter.reset_decode()
            for dilation in BOX_DILATIONS:
                record(f"a {view.name}: GT box +{dilation} px", "GT box per GT slice", view.name, case,
                       row_a(view, segmenter, dilation))
        if "b" in rows:
            segmenter.precompute(zeroshot, selected_slices(case, zeroshot))
            segmenter.reset_decode()
            for label, how, overrides in (("b zero-shot, perturbed GT saliency", Perturbation(), {}),
                                          ("b zero-shot, blurred GT saliency only", BLUR_ONLY, {}),
                                          ("b zero-shot, perturbed, prompt_type points", Perturbation(),
                                           {"prompt_type": "points"})):
                options = preset_options(args.preset, slices="all", device="cpu", seed=args.seed, **overrides)
                maps = perturbed_maps(case, zeroshot, 1, args.seed, how)
                prediction = row_b(case, zeroshot, options, maps, segmenter)
                record(label, "GT-made saliency, GT slices", zeroshot.name, case, prediction,
                       zeroshot.to_volume(coarse_masks(maps, options, case)))
        if "c" in rows:
            segmenter.precompute(cohort, selected_slices(case, cohort))
            segmenter.reset_decode()
            masks = cam_masks(case, cohort, args.seed, Perturbation())
            record("c CLISC pseudo-label, perturbed GT CAM", "GT-made CAM, GT slices", cohort.name, case,
                   row_c(cohort, masks, segmenter), cohort.to_volume(masks))
            for name, patch in local_patches(segmenter).items() if args.patches else ():
                with patch:
                    view = cohort
                    if "equalisation" in name:  # other images: embedded and timed under their own name
                        view = cohort_view(case)
                        view.name = f"clisc, {name}"
                    record(f"c LOCAL PATCH: {name}", "GT-made CAM, GT slices", view.name, case,
                           row_c(view, masks, segmenter), cohort.to_volume(masks))
        print(f"  {case.dataset}/{case.name}: {time.perf_counter() - started:.0f} s", flush=True)
    summaries = []
    for row in table.values():
        tag = row.view if row.view in segmenter.encoded else None
        summaries.append(row.summary(segmenter.seconds_per_slice(tag) if tag else None))
    return summaries


# ---- speed ---------------------------------------------------------------------------------------------------------

def encoder_seconds(sam, images: np.ndarray, dtype: Optional[torch.dtype], batch_size: int) -> float:
    """Seconds per slice of `SliceSegmenter.embed` on (B, H, W, 3) uint8 images, after one warm-up slice."""
    segmenter = SliceSegmenter(sam, dtype, batch_size)
    segmenter.embed(images[:1])
    started = time.perf_counter()
    segmenter.embed(images)
    return (time.perf_counter() - started) / len(images)


def speed(args: argparse.Namespace, folder: Path) -> dict:
    """Encoder seconds per slice (LiteMedSAM, random vit_b; fp32, bf16) and a whole BraTS volume through
    `ZeroShotSegmenter` (preset fast, slices auto, litemedsam, random full-size CLIP ViT-B-16)."""
    volume = read_volume(DATA / "brats2015" / "pat0001" / "flair.nii.gz")
    slices = percentile_window_uint8(volume.array)[60:60 + args.speed_slices]
    images = np.repeat(slices[..., None], 3, axis=-1)
    result = {"slices": int(len(images)), "batch_size": args.sam_batch_size, "encoder_s_per_slice": {}}
    vit_b = save_random_sam(folder / "sam_vit_b_random.pth", "vit_b")
    for name, spec in (("litemedsam", "litemedsam"), ("vit_b (random weights)", vit_b)):
        sam = load_sam(spec)
        for precision, dtype in DTYPES.items():
            seconds = encoder_seconds(sam, images, dtype, args.sam_batch_size)
            result["encoder_s_per_slice"][f"{name} {precision}"] = seconds
            print(f"  encoder {name:<24} {precision:<9} {seconds:6.2f} s/slice", flush=True)
    lite = result["encoder_s_per_slice"]
    for precision in DTYPES:
        ratio = lite[f"vit_b (random weights) {precision}"] / lite[f"litemedsam {precision}"]
        print(f"  vit_b / litemedsam, {precision}: {ratio:.1f}x")
    clip_folder = save_random_clip(folder / "clip_vit_b16_random", "ViT-B-16")
    options = preset_options("fast", slices="auto", sam="litemedsam", clip=str(clip_folder), device="cpu")
    segmenter = ZeroShotSegmenter(options, clip=load_clip(clip_folder), sam=load_sam("litemedsam"))
    started = time.perf_counter()
    report = segmenter.segment(volume, ["brain tumor"]).report
    total = time.perf_counter() - started
    selected = len(report["selected_slices"]["brain tumor"])
    result["zeroshot_volume"] = {"seconds": report["seconds"], "total_s": total, "slices_selected": selected,
                                 "slices_embedded": report["slices_embedded"], "shape_kji": report["shape_kji"]}
    print(f"  ZeroShotSegmenter, preset fast, slices auto, litemedsam, random CLIP ViT-B-16, {volume.array.shape}:")
    for stage, seconds in report["seconds"].items():
        per = seconds / max(selected if stage == "saliency" else report["slices_embedded"], 1)
        print(f"    {stage:<10} {seconds:8.1f} s" + ("" if stage == "relevance" else f"  ({per:.2f} s per slice)"))
    print(f"    total      {total:8.1f} s; slices selected by (random) CLIP: {selected} of {volume.array.shape[0]}, "
          f"embedded by SAM: {report['slices_embedded']}")
    return result


# ---- row d ---------------------------------------------------------------------------------------------------------

def row_d(args: argparse.Namespace, folder: Path) -> dict:
    """`clisc train` on the 4 BraTS FLAIR volumes with ground-truth slice labels written first; scores of its
    CAM masks, pseudo-labels and final U-Net."""
    run = Path(args.run_dir) if args.run_dir else folder / "run"
    resume = (run / "config.json").exists()
    if resume and not args.resume:
        sys.exit(f"{run} holds a run already: give another --run-dir, or --resume to finish it")
    if resume:  # the run's cohort, labels and CLIP lie in the folder it was started from: write them there again
        folder = Path(json.loads((run / "config.json").read_text())["cohort"]).parent
        folder.mkdir(parents=True, exist_ok=True)
    cases = brats_cases()
    paths = [DATA / "brats2015" / case.name / "flair.nii.gz" for case in cases]
    cohort, labels, split = folder / "cohort.csv", folder / "labels.csv", folder / "holdout.txt"
    cohort.write_text("image\n" + "".join(f"{path}\n" for path in paths))
    labels.write_text("case_id,label\n" + "".join(f"{c.name}_flair,{DATA / 'brats2015' / c.name / 'label.nii.gz'}\n"
                                                  for c in cases))
    held_out = [name for name in args.holdout.split(",") if name]
    split.write_text("".join(f"{name}_flair\n" for name in held_out))
    (run / "slice_labels").mkdir(parents=True, exist_ok=resume)
    slice_counts = {}
    for case in cases:  # the only oracle: per pre-processed (cropped) axial slice, 1 where it holds tumour
        _, crop = preprocess(case.volume)
        labels_k = case.truth[crop].any(axis=(1, 2)).astype(int).tolist()
        (run / "slice_labels" / f"{case.name}_flair.json").write_text(json.dumps(labels_k))
        slice_counts[case.name] = [sum(labels_k), len(labels_k)]
    clip = save_random_clip(folder / "clip_vit_b32_random", "ViT-B-32")
    command = [sys.executable, "-m", "clisc", "train", str(cohort), "--prompt", "brain tumor", "--out", str(run),
               "--sam", "litemedsam", "--clip", str(clip), "--classifier", args.classifier,
               "--classifier-weights", args.classifier_weights,
               "--classifier-epochs", str(args.classifier_epochs),
               "--classifier-image-size", str(args.classifier_image_size),
               "--unet-epochs", str(args.unet_epochs), "--patch-size", str(args.patch_size),
               "--s3f-rounds", str(args.s3f_rounds), "--sam-precision", args.precision, "--device", "cpu",
               "--seed", str(args.seed), "--labels", str(labels)]
    command += (["--holdout-split", str(split)] if held_out else []) + (["--resume"] if resume else [])
    print("  " + shlex.join(command), flush=True)
    started = time.perf_counter()
    with open(folder / "train.log", "w") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    total = time.perf_counter() - started
    if completed.returncode:
        sys.exit(f"clisc train failed ({completed.returncode}); see {folder / 'train.log'} and {run / 'run.log'}")
    results = {"command": command, "run_dir": str(run), "total_s": total, "gt_slice_labels": slice_counts,
               "held_out": held_out, "stage_s": stage_seconds(run / "run.log"), "scores": {}}
    for case in cases:
        case_id = f"{case.name}_flair"
        _, crop = preprocess(case.volume)
        shape = case.truth.shape
        if not (run / "predictions" / f"{case_id}.nii.gz").is_file():
            results["scores"][case.name] = {"skipped": (run / "skipped" / f"{case_id}.json").read_text()}
            continue
        if case.name in held_out:  # in no stage but the final U-Net's prediction
            results["scores"][case.name] = {
                "U-Net (final)": score(read_volume(run / "predictions" / f"{case_id}.nii.gz").array > 0, case)}
            continue
        cams = np.load(run / "cams_amda" / f"{case_id}.npz")
        masks = {"CAM mask (after AMDA)": uncrop(cams["mask"], crop, shape),
                 "pseudo-label": read_volume(run / "pseudo_labels" / f"{case_id}.nii.gz").array > 0,
                 "U-Net (final)": read_volume(run / "predictions" / f"{case_id}.nii.gz").array > 0}
        results["scores"][case.name] = {name: score(mask, case) for name, mask in masks.items()}
        accuracy = (cams["positive"] == case.truth[crop].any(axis=(1, 2))).mean()
        results["scores"][case.name]["classifier slice accuracy"] = float(accuracy)
    return results


def stage_seconds(log: Path) -> Dict[str, float]:
    """Seconds between consecutive "step X finished" lines of a run.log (the first from the first line)."""
    stamps = []
    for line in log.read_text().splitlines():
        match = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) \w+: (?:step (\S+) finished|cohort)", line)
        if match:
            stamps.append((datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f"), match.group(2) or "start"))
    return {step: (stamp - before).total_seconds() for (before, _), (stamp, step) in zip(stamps, stamps[1:])}


def print_row_d(results: dict, classifier: str) -> None:
    scored = {case: scores for case, scores in results["scores"].items() if "skipped" not in scores}
    held_out = results["held_out"]
    print(f"\nd: whole CLISC cohort run, BraTS ({len(scored)} of {len(results['scores'])} volumes scored), GT slice "
          f"labels, classifier {classifier}; held out: {', '.join(held_out) or 'none'}; "
          f"{results['total_s'] / 60:.1f} min")
    print("  stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in results["stage_s"].items()))
    for case, scores in results["scores"].items():
        if case not in scored:
            print(f"  {case} skipped by the run: {scores['skipped']}")
    for cohort, members in (("training cohort", [c for c in scored if c not in held_out]),
                            ("held out", [c for c in scored if c in held_out])):
        if not members:
            continue
        print(f"  {cohort}: {'output':<24} {'Dice mean':>9} {'median':>7} {'HD95 mm mean':>12} {'median':>7} {'NSD':>6}")
        for name in scored[members[0]]:
            scores = [scored[case][name] for case in members]
            if name == "classifier slice accuracy":
                print(f"  {cohort}: {name:<24} {np.mean(scores):>9.3f}")
                continue
            dice, hd95 = [s["dice"] for s in scores], [s["hd95_mm"] for s in scores]
            print(f"  {cohort}: {name:<24} {np.mean(dice):>9.3f} {np.median(dice):>7.3f} {np.mean(hd95):>12.1f} "
                  f"{np.median(hd95):>7.1f} {np.mean([s['nsd'] for s in scores]):>6.3f}")
    for case, scores in scored.items():
        print(f"  {case}{' (held out)' if case in held_out else ''}: " + ", ".join(
            f"{n} Dice {s['dice']:.3f} HD95 {s['hd95_mm']:.1f}" if isinstance(s, dict) else f"{n} {s:.2f}"
            for n, s in scores.items()))


# ---- main ----------------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="a,b,c,speed", help=f"comma-separated, of {','.join(ROWS)}")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="rows a-c: comma-separated, of brats,busi,ct")
    parser.add_argument("--json", metavar="OUT.json", help="write every figure (per case too) here")
    parser.add_argument("--patches", action="store_true", help="row c: also the LOCAL PATCHES of the engine")
    parser.add_argument("--preset", default="fast", help="row b: the preset whose coarse-mask/prompt settings apply")
    parser.add_argument("--precision", choices=list(DTYPES), default="bfloat16",
                        help="LiteMedSAM encoder precision for rows a-d (default bfloat16, the fast preset's)")
    parser.add_argument("--sam-batch-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed-slices", type=int, default=3, help="slices timed per encoder and precision")
    parser.add_argument("--classifier-epochs", type=int, default=2, help="row d")
    parser.add_argument("--classifier-image-size", type=int, default=224, help="row d")
    parser.add_argument("--unet-epochs", type=int, default=200, help="row d, per round (one patch per case each)")
    parser.add_argument("--patch-size", type=int, default=96, help="row d")
    parser.add_argument("--s3f-rounds", type=int, default=1, help="row d")
    parser.add_argument("--run-dir", help="row d: the run folder (default: a temporary one)")
    parser.add_argument("--resume", action="store_true", help="row d: finish the interrupted run in --run-dir")
    parser.add_argument("--classifier", default="resnet50", help="row d: --classifier of clisc train")
    parser.add_argument("--classifier-weights", default="none",
                        help="row d: --classifier-weights of clisc train (none: random; imagenet: the backbone's)")
    parser.add_argument("--holdout", default="", metavar="pat0004,...",
                        help="row d: BraTS cases kept out of every stage (--holdout-split) and scored apart")
    args = parser.parse_args()
    rows, datasets = args.rows.split(","), args.datasets.split(",")
    if not set(rows) <= set(ROWS) or not set(datasets) <= set(DATASETS):
        parser.error(f"--rows: of {','.join(ROWS)}; --datasets: of {','.join(DATASETS)}")
    if not DATA.exists():
        sys.exit(f"needs {DATA}")
    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; LiteMedSAM encoder {args.precision}, "
          f"batch {args.sam_batch_size}")
    print(f"empty cases: {EMPTY_CASE_RULE}; NSD at {NSD_TOLERANCE_MM} mm (BUSI: px)")
    figures: dict = {"settings": vars(args), "perturbation": vars(Perturbation()),
                     "ct_window_hu": CT_WINDOW_HU, "datasets": {}}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        if {"a", "b", "c"} & set(rows):
            print(check_pseudo_label_defaults())
            segmenter = EmbeddingCache(load_sam("litemedsam"), DTYPES[args.precision], args.sam_batch_size)
            loaders = {"brats": (brats_cases, "BraTS FLAIR whole tumour (label > 0), per volume", "mm"),
                       "busi": (busi_cases, "BUSI lesions, per image (8 benign, 8 malignant, 4 normal)", "px"),
                       "ct": (None, "CT organs (TotalSegmentator reference), per organ", "mm")}
            for dataset in datasets:
                started = time.perf_counter()
                loader, title, unit = loaders[dataset]
                extra: dict = {}
                cases = ct_cases(extra) if dataset == "ct" else loader()
                if extra:
                    print(f"CT reference_seg: {extra}")
                print(f"{dataset}: {len(cases)} case(s)", flush=True)
                summaries = run_dataset(cases, segmenter, rows, args)
                print_table(f"{title}; {time.perf_counter() - started:.0f} s", summaries, unit)
                if dataset == "ct":
                    for s in summaries:
                        print(f"    {s['row']:<58} " + ", ".join(f"{organ} {c['dice']:.3f}" for organ, c in s["cases"].items()))
                figures["datasets"][dataset] = {"rows": summaries, **extra}
        if "speed" in rows:
            print("\nspeed:")
            figures["speed"] = speed(args, folder)
        if "d" in rows:
            print("\nrow d:")
            figures["d"] = row_d(args, folder)
            print_row_d(figures["d"], f"{args.classifier} from {args.classifier_weights}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=float))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
