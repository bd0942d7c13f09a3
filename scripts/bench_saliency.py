"""Seconds per image of each saliency method on a full-size open_clip ViT-B-16 (random weights).

Each method runs on one 224 x 224 image with its default options, in float32 and under bfloat16 autocast.
M2IB is also timed the straightforward way, the whole model at every step as in the authors' code (but, as
in the package, without weight gradients), so the gain of the cached prefix is measured in the same run.

    .venv/bin/python scripts/bench_saliency.py --repeats 1
"""
from __future__ import annotations

import argparse
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
    args = parser.parse_args()

    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None).eval()
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        text = model.encode_text(open_clip.get_tokenizer(args.model)(["a photo of a tumour"]), normalize=True)
    print(f"{args.model}, random weights, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"fastest of {args.repeats}")

    runs = {
        "gradcam": lambda dtype: compute_saliency("gradcam", model, image, text, autocast_dtype=dtype),
        "gscorecam (top_k 300)": lambda dtype: compute_saliency("gscorecam", model, image, text, autocast_dtype=dtype),
        "m2ib, cached prefix": lambda dtype: compute_saliency(
            "m2ib", model, image, text, autocast_dtype=dtype, generator=torch.Generator().manual_seed(0)),
        "m2ib, whole model each step": lambda dtype: m2ib_whole_model(model, image, text, autocast_dtype=dtype),
    }
    runs["gradcam"](None)  # warm-up
    for name, run in runs.items():
        figures = [
            f"{key} {seconds_per_image(lambda: run(DTYPES[key]), args.repeats):7.2f} s"
            for key in args.dtypes.split(",")
        ]
        print(f"{name:30s} " + "   ".join(figures), flush=True)


if __name__ == "__main__":
    main()
