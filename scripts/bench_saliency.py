"""Seconds per image of each saliency method on a full-size open_clip ViT-B-16 (random weights).

Each method runs on one 224 x 224 image with its default options, in float32 and under bfloat16 autocast, and
its time is also given as a multiple of M2IB's in the same precision. M2IB is also timed the straightforward
way, the whole model at every step as in the authors' code (but, as in the package, without weight
gradients), so the gain of the cached prefix is measured in the same run. The load average before and after
is printed: on a shared machine only the ratios mean anything.

What the methods cost, in forward passes of the image tower: GradCAM one, and one backward; gScoreCAM one
and a backward, then ``top_k`` (300) passes of masked images, batched; M2IB the blocks up to the bottleneck
once, then 10 steps on 10 noise samples of the 3 blocks after it, forward and backward (about 50 passes'
worth).

    .venv/bin/python scripts/bench_saliency.py --repeats 1
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from clisc.torchvision_compat import import_torchvision

import_torchvision()

import open_clip  # noqa: E402

from clisc.precision import autocast, prepared  # noqa: E402
from clisc.saliency import compute_saliency  # noqa: E402
from clisc.saliency.vision_tower import (  # noqa: E402
    cosine_to_text,
    tokens_after_block,
    vision_blocks,
)

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def m2ib_whole_model(model, images, text, layer=9, beta=1.0, steps=10, samples=10, autocast_dtype=None):
    """The bottleneck spliced in by a hook and the whole tower run at every step; timing only."""
    image = images[:1]
    with prepared(model):
        with torch.no_grad():
            alpha = torch.full(tokens_after_block(model, image, layer)[0].shape, 5.0, requires_grad=True)
        optimizer = torch.optim.Adam([alpha], lr=1.0)
        kl = []

        def bottleneck(module, inputs, output):
            lam = torch.sigmoid(alpha)
            output = output.float()
            kl[:] = [-0.5 * (1 + torch.log((1 - lam) ** 2) - (lam * output) ** 2 - (1 - lam) ** 2)]
            return lam * output + (1 - lam) * torch.randn(output.shape)

        handle = vision_blocks(model)[layer].register_forward_hook(bottleneck)
        try:
            with torch.enable_grad():
                for _ in range(steps):
                    with autocast(image.device, autocast_dtype):
                        features = model.visual(image.expand(samples, -1, -1, -1))
                    loss = beta * kl[0].mean() - cosine_to_text(features, text).mean()
                    (alpha.grad,) = torch.autograd.grad(loss, alpha)
                    optimizer.step()
        finally:
            handle.remove()


def seconds_per_image(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the fastest is reported")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture (random weights)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--skip-whole-model", action="store_true",
                        help="leave out M2IB's whole-model timing (the slowest, for comparison only)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None).eval()
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        text = model.encode_text(open_clip.get_tokenizer(args.model)(["a photo of a tumour"]), normalize=True)
    print(f"{args.model}, random weights, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"fastest of {args.repeats}; load average {load()}")

    runs = {
        "gradcam": lambda dtype: compute_saliency("gradcam", model, image, text, autocast_dtype=dtype),
        "gscorecam (top_k 300)": lambda dtype: compute_saliency("gscorecam", model, image, text, autocast_dtype=dtype),
        "m2ib, cached prefix": lambda dtype: compute_saliency(
            "m2ib", model, image, text, autocast_dtype=dtype, generator=torch.Generator().manual_seed(0)),
    }
    if not args.skip_whole_model:
        runs["m2ib, whole model each step"] = lambda dtype: m2ib_whole_model(model, image, text, autocast_dtype=dtype)
    runs["gradcam"](None)  # warm-up
    dtypes = args.dtypes.split(",")
    seconds = {}
    for key in dtypes:
        for name, run in runs.items():
            seconds[name, key] = seconds_per_image(lambda: run(DTYPES[key]), args.repeats)
            print(f"  {name}, {key}: {seconds[name, key]:.2f} s", flush=True)
    for name in runs:
        figures = [f"{key} {seconds[name, key]:7.2f} s ({seconds[name, key] / seconds['m2ib, cached prefix', key]:5.2f}"
                   " x M2IB)" for key in dtypes]
        print(f"{name:30s} " + "   ".join(figures), flush=True)
    print(f"load average at the end {load()}")


def load() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


if __name__ == "__main__":
    main()
