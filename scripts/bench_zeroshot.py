"""Benchmark of the zero-shot pipeline on a 240×240×155 BraTS MRI with full-size random-weight models.

Prints: this machine's fp32 and bf16 matrix throughput and the SAM vit_b encoder's FLOPs (the bound), the
pipeline's seconds per stage, slices embedded and peak memory for a preset, and the naive pipeline (the
same saliency method in fp32 without our batching, and stock ``SamPredictor.set_image`` in fp32 on every
slice) measured in the same run on a sample of slices and scaled to the slice count.

    python scripts/bench_zeroshot.py [--preset fast] [--slices all] [--naive-samples 3]

Random weights: the figures are about speed and memory, not accuracy.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from bench_saliency import m2ib_whole_model  # scripts/ is on sys.path when run as a script

from clisc.models.loaders import load_clip, load_sam
from clisc.models.random_weights import save_random_clip, save_random_sam
from clisc.readers import read_volume
from clisc.saliency import compute_saliency
from clisc.torchvision_compat import import_torchvision
from clisc.zeroshot import ZeroShotSegmenter, percentile_window_uint8, preset_options, slice_range

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats2015" / "pat0001" / "flair.nii.gz"


def matmul_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - started) / 1e9


def encoder_gflop(sam) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        sam.image_encoder(torch.zeros(1, 3, 1024, 1024))
    return counter.get_total_flops() / 1e9


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def naive_seconds_per_slice(sam, clip, saliency: str, saliency_options: dict, slices: np.ndarray) -> tuple:
    """Stock SamPredictor.set_image (fp32) and the saliency in fp32, one slice at a time (M2IB: the whole
    tower run at every step, as the authors' code does, though without weight gradients)."""
    import_torchvision()
    from segment_anything import SamPredictor

    from clisc.clip_scoring import ClipScorer

    scorer = ClipScorer(clip, torch.device("cpu"))
    text = scorer.prompt_embedding("brain tumor")[None]
    predictor = SamPredictor(sam)
    saliency_seconds = sam_seconds = 0.0
    naive_saliency = m2ib_whole_model if saliency == "m2ib" else partial(compute_saliency, saliency)
    for plane in slices:
        started = time.perf_counter()
        naive_saliency(clip.model, scorer.images(plane[None]), text, **saliency_options)
        saliency_seconds += time.perf_counter() - started
        started = time.perf_counter()
        predictor.set_image(np.repeat(plane[..., None], 3, axis=-1))
        sam_seconds += time.perf_counter() - started
    return saliency_seconds / len(slices), sam_seconds / len(slices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--slices", default="all")
    parser.add_argument("--naive-samples", type=int, default=3, help="slices timed for the naive pipeline")
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"needs {DATA}")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    print(f"matmul throughput: fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s")

    with tempfile.TemporaryDirectory() as folder:
        sam_file = save_random_sam(Path(folder) / "sam_vit_b_random.pth", "vit_b")
        clip_folder = save_random_clip(Path(folder) / "clip_vit_b16_random", "ViT-B-16")
        sam, clip = load_sam(sam_file), load_clip(clip_folder)
        gflop = encoder_gflop(sam)
        print(f"SAM vit_b encoder: {gflop:.0f} GFLOP per slice; bound {gflop / bf16:.2f} s bf16, "
              f"{gflop / fp32:.2f} s fp32")

        volume = read_volume(DATA)
        options = preset_options(args.preset, slices=args.slices, device="cpu", clip=str(clip_folder),
                                 sam=str(sam_file))
        segmenter = ZeroShotSegmenter(options, clip, sam)
        rss_before = peak_rss_gb()
        started = time.perf_counter()
        result = segmenter.segment(volume, ["brain tumor"])
        total = time.perf_counter() - started
        report = result.report
        embedded = report["slices_embedded"]
        print(f"\npipeline --preset {args.preset} --slices {args.slices} on {volume.array.shape} (K, J, I):")
        for stage, seconds in report["seconds"].items():
            print(f"  {stage:<10} {seconds:8.1f} s")
        print(f"  total      {total:8.1f} s; slices embedded by SAM: {embedded} of {volume.array.shape[0]}")
        print(f"  SAM per embedded slice: {report['seconds']['sam'] / max(embedded, 1):.2f} s "
              f"({report['seconds']['sam'] / max(embedded, 1) / (gflop / bf16):.2f}x the bf16 bound)")
        print(f"  peak RSS: {peak_rss_gb():.2f} GB (before the run: {rss_before:.2f} GB)")

        slices = np.moveaxis(percentile_window_uint8(volume.array), report["axis"], 0)
        slices = slices[slice_range(options.slices, len(slices))]  # the same slices as the pipeline
        nonblank = np.flatnonzero(np.ptp(slices.reshape(len(slices), -1), axis=1) > 0)
        sample = slices[nonblank[np.linspace(0, len(nonblank) - 1, args.naive_samples).astype(int)]]
        sam = load_sam(sam_file)  # stock encoder: the pipeline replaced the attention of the first one
        saliency_s, sam_s = naive_seconds_per_slice(sam, clip, options.saliency, options.saliency_options, sample)
        naive_all = (saliency_s + sam_s) * len(slices)
        naive_nonblank = (saliency_s + sam_s) * len(nonblank)
        print(f"\nnaive, per slice (mean of {len(sample)}): saliency {saliency_s:.2f} s, "
              f"SamPredictor.set_image fp32 {sam_s:.2f} s")
        print(f"naive on all {len(slices)} slices: {naive_all:.0f} s; on the {len(nonblank)} non-blank: "
              f"{naive_nonblank:.0f} s")
        print(f"pipeline / naive: {total / naive_all:.3f} (all slices), {total / naive_nonblank:.3f} (non-blank)")
        print(f"SAM encoder speed-up per slice: {sam_s / (report['seconds']['sam'] / max(embedded, 1)):.1f}x")


if __name__ == "__main__":
    main()
