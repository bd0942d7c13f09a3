"""Method fidelity of two things CLISC adds to the papers: the slice-relevance gate and bf16 LiteMedSAM (issue 12).

Both parts use the real pretrained LiteMedSAM (`load_sam("litemedsam")` in `clisc.sam.SliceSegmenter`) on the 4
BraTS FLAIR volumes of ../shared/data (whole tumour = label > 0), on the slices exactly as `ZeroShotSegmenter`
gives them to SAM (`bench_accuracy.zeroshot_view`: `percentile_window_uint8` of the volume along the auto slice
axis). The data loaders, the view, the embedding cache and row (a) come from scripts/bench_accuracy.py.

(1) Slice-relevance gate (`--slices auto`; neither paper has one). PRODUCT: the gate itself, computed as
    `ZeroShotSegmenter.segment` computes it: relevance 0 on slices without contrast (not candidates),
    `scipy.ndimage.uniform_filter1d(relevance, size=relevance_smoothing, mode="nearest")` along the slice axis,
    selected = smoothed >= relevance_threshold and candidate, with the option values of
    `clisc.zeroshot.SegmentOptions` (default and `fast` preset: threshold 0.5, smoothing 5; other thresholds and
    window 1 as variants). ORACLE: the relevance CLIP would give (no pretrained CLIP exists here). Two oracles,
    per candidate slice: "binary" r = 1 on ground-truth tumour slices, 0 elsewhere; "area" r = the slice's
    tumour area / the largest slice's tumour area (a blurred oracle: small tumour cross-sections score low);
    each plus white Gaussian noise (sd `--sigmas`), clipped to [0, 1], over `--seeds` seeds (the same noise
    draw for every threshold and window, seeded by seed, oracle, volume, sigma). ORACLE too: the SAM prompt on
    a selected tumour slice is the ground-truth box grown by 5 px (row (a) of bench_accuracy, LiteMedSAM
    float32, mask kept whole); a selected slice without tumour gets no box and so adds nothing to the "Dice
    ceiling" (in the product it would get a saliency box and likely a false positive: see "non-tumour
    selected"). Per volume and in total: tumour slices lost (tumour slices not selected), tumour voxels on
    lost slices as a fraction of all tumour voxels, non-tumour slices selected, and the 3D Dice of the GT-box
    masks on the selected slices only (the per-slice masks are computed once; a threshold only chooses which
    ones count). Shows what the gate can cost at best, given a relevance of a known quality; cannot show how
    good a real CLIP's relevance is.

(2) bf16 LiteMedSAM (the `fast` preset's `sam_precision`). PRODUCT: `SliceSegmenter(sam, torch.bfloat16)`
    against `SliceSegmenter(sam, None)` (float32): the image encoder under bf16 autocast; the prompt encoder
    and mask decoder run in float32 in both. ORACLE: the prompt, the ground-truth box + 5 px, on every
    tumour slice. Per volume: 3D Dice of each against the ground truth (and HD95, NSD by `clisc.metrics`),
    Dice between the float32 and bf16 masks, pixels that differ (total, % of the float32 mask, % of the
    slices' pixels; per slice median, 95th percentile, max) and the max/mean absolute difference of the image
    embeddings (with the mean |float32 embedding| for scale). Each slice is encoded once per precision.
    Optionally (`--clip-drift`, on by default): bf16 against float32 for the gate's relevance from a
    RANDOM-WEIGHT full-size CLIP ViT-B-16 (`ClipScorer` as the engine uses it, positive prompt ensemble
    against the engine's negative prompts) on one volume: how many gate decisions flip. With random weights
    this measures numerical drift only, not accuracy (its relevance sits in a narrow band, so a threshold at
    the median of the float32 values is also tried: the setting most sensitive to drift).

    python scripts/bench_fidelity.py [--seeds 5] [--sigmas 0,0.1,0.2,0.3] [--thresholds 0.3,0.4,0.5,0.6,0.7]
                                     [--no-clip-drift] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from scipy.ndimage import uniform_filter1d

from clisc.torchvision_compat import import_torchvision

import_torchvision()

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_accuracy as ba  # noqa: E402

from clisc.clip_scoring import ClipScorer  # noqa: E402
from clisc.metrics import evaluate  # noqa: E402
from clisc.models.loaders import load_clip, load_sam  # noqa: E402
from clisc.models.random_weights import save_random_clip  # noqa: E402
from clisc.zeroshot import SegmentOptions, preset_options  # noqa: E402

DILATION = 5
ORACLES = ("binary", "area")


# ---- the gate, as the engine computes it ---------------------------------------------------------------------

def gate(relevance: np.ndarray, candidates: np.ndarray, threshold: float, smoothing: int) -> np.ndarray:
    """Selected slices (..., N) bool from relevance (..., N), as `ZeroShotSegmenter.segment` selects them."""
    smoothed = uniform_filter1d(relevance, size=smoothing, axis=-1, mode="nearest")
    return (smoothed >= threshold) & candidates


def oracle_relevance(kind: str, area: np.ndarray, candidates: np.ndarray, sigma: float, seeds: int,
                     volume: str) -> np.ndarray:
    """(seeds, N) oracle relevance: binary or area-fraction base plus N(0, sigma), clipped to [0, 1], 0 off the
    candidates (the engine computes relevance only on slices with contrast)."""
    base = (area > 0).astype(float) if kind == "binary" else area / area.max()
    out = np.zeros((seeds, len(area)))
    for seed in range(seeds):
        rng = np.random.default_rng([seed, ORACLES.index(kind), zlib.crc32(volume.encode()), int(round(sigma * 1000))])
        noisy = np.clip(base + rng.normal(0, sigma, base.shape), 0, 1) if sigma else base
        out[seed] = np.where(candidates, noisy, 0.0)
    return out


# ---- part 2: float32 vs bf16 LiteMedSAM on one volume -----------------------------------------------------------

def slice_masks(view: ba.View, segmenter: ba.EmbeddingCache, axis: int) -> np.ndarray:
    """(N, H, W) bool on the view's slices: `bench_accuracy.row_a` (GT box + DILATION px on every GT slice)."""
    return np.moveaxis(ba.row_a(view, segmenter, DILATION), axis, 0)


def precision_volume(case: ba.Case, segmenters: Dict[str, ba.EmbeddingCache]) -> dict:
    """Masks and embeddings of every tumour slice of ``case`` in float32 and bf16; per-slice counts for part 1."""
    axis = ba.slice_axis(case.volume, "auto")
    view = ba.zeroshot_view(case)
    tumour = np.flatnonzero(view.truth.any(axis=(1, 2)))
    masks, embeddings, seconds = {}, {}, {}
    for name, segmenter in segmenters.items():
        segmenter.store.clear()
        segmenter.tag = name
        before = segmenter.encode_seconds.get(name, 0.0)
        segmenter.embed(view.images[tumour])  # batched as the engine embeds (EmbeddingCache: chunks of 8)
        masks[name] = slice_masks(view, segmenter, axis)
        embeddings[name] = segmenter.embed(view.images[tumour])  # cached: no second encoder pass
        seconds[name] = (segmenter.encode_seconds[name] - before) / len(tumour)
    f32, b16 = masks["float32"], masks["bfloat16"]
    differ = (f32 != b16)[tumour].reshape(len(tumour), -1).sum(1)
    e32, e16 = embeddings["float32"], embeddings["bfloat16"]
    delta = (e32 - e16).abs()
    cosine = torch.nn.functional.cosine_similarity(e32.flatten(1), e16.flatten(1), dim=1)
    inter = lambda a, b: int(np.logical_and(a, b).sum())  # noqa: E731
    result = {
        "axis": int(axis), "tumour_slices": int(len(tumour)), "encoder_s_per_slice": seconds,
        "scores": {name: evaluate(np.moveaxis(m, 0, axis), case.truth, case.spacing) for name, m in masks.items()},
        "dice_f32_vs_bf16": 2 * inter(f32, b16) / max(int(f32.sum() + b16.sum()), 1),
        "pixels_differ": int(differ.sum()), "f32_mask_pixels": int(f32.sum()),
        "pixels_on_tumour_slices": int(len(tumour) * np.prod(view.truth.shape[1:])),
        "slices_with_difference": int((differ > 0).sum()),
        "differ_per_slice": {"median": float(np.median(differ)), "p95": float(np.percentile(differ, 95)),
                             "max": int(differ.max())},
        "differ_per_slice_list": differ.tolist(),
        "embedding": {"max_abs_diff": float(delta.max()), "mean_abs_diff": float(delta.mean()),
                      "mean_abs_f32": float(e32.abs().mean()), "min_cosine": float(cosine.min())},
    }
    # per-slice counts for the gate's Dice ceiling (float32 masks): |P & T|, |P|, |T|
    truth = view.truth.reshape(len(view.truth), -1)
    pred = f32.reshape(len(f32), -1)
    grey = view.images[..., 0].reshape(len(view.truth), -1)
    result["per_slice"] = {"intersection": (pred & truth).sum(1), "predicted": pred.sum(1), "truth": truth.sum(1),
                           "candidate": np.ptp(grey, axis=1) > 0}
    return result


# ---- part 1: the gate on every volume ------------------------------------------------------------------------------

def gate_figures(selected: np.ndarray, per_slice: dict) -> dict:
    """Figures of (seeds, N) selections on one volume; each a (seeds,) array."""
    truth, inter, pred = per_slice["truth"], per_slice["intersection"], per_slice["predicted"]
    tumour = truth > 0
    lost = tumour & ~selected
    return {"lost_slices": lost.sum(1), "lost_voxels": (lost * truth).sum(1), "truth_voxels": np.full(len(selected), truth.sum()),
            "nontumour_selected": (selected & ~tumour).sum(1),
            "dice": 2 * (selected * inter).sum(1) / ((selected * pred).sum(1) + truth.sum())}


def gate_study(volumes: Dict[str, dict], args: argparse.Namespace, options: SegmentOptions) -> List[dict]:
    rows = []
    settings = [(t, options.relevance_smoothing) for t in args.thresholds]
    settings += [(options.relevance_threshold, w) for w in (1,) if w != options.relevance_smoothing]
    for kind in ORACLES:
        for sigma in args.sigmas:
            relevance = {name: oracle_relevance(kind, v["per_slice"]["truth"].astype(float), v["per_slice"]["candidate"],
                                                sigma, args.seeds, name) for name, v in volumes.items()}
            for threshold, window in settings:
                per_volume = {name: gate_figures(gate(relevance[name], v["per_slice"]["candidate"], threshold, window),
                                                 v["per_slice"]) for name, v in volumes.items()}
                lost = sum(f["lost_slices"] for f in per_volume.values())
                lost_vox = sum(f["lost_voxels"] for f in per_volume.values())
                truth_vox = sum(f["truth_voxels"] for f in per_volume.values())
                nontumour = sum(f["nontumour_selected"] for f in per_volume.values())
                dice = np.mean([f["dice"] for f in per_volume.values()], axis=0)  # mean over volumes, per seed
                rows.append({"oracle": kind, "sigma": sigma, "threshold": threshold, "smoothing": window,
                             "total": {"lost_slices_mean": float(lost.mean()), "lost_slices_min": int(lost.min()),
                                       "lost_slices_max": int(lost.max()),
                                       "lost_voxel_fraction_mean": float((lost_vox / truth_vox).mean()),
                                       "lost_voxel_fraction_max": float((lost_vox / truth_vox).max()),
                                       "nontumour_selected_mean": float(nontumour.mean()),
                                       "nontumour_selected_max": int(nontumour.max()),
                                       "dice_mean_over_volumes": float(dice.mean()), "dice_min_over_seeds": float(dice.min())},
                             "per_volume": {name: {k: [float(x) for x in val] for k, val in f.items()}
                                            for name, f in per_volume.items()}})
    return rows


def print_gate(rows: List[dict], volumes: Dict[str, dict], options: SegmentOptions, seeds: int) -> None:
    names = list(volumes)
    tumour = {n: int((v["per_slice"]["truth"] > 0).sum()) for n, v in volumes.items()}
    nontumour = {n: int(((v["per_slice"]["truth"] == 0) & v["per_slice"]["candidate"]).sum()) for n, v in volumes.items()}
    ceiling = np.mean([v["scores"]["float32"]["dice"] for v in volumes.values()])
    print(f"\n(1) slice-relevance gate; volumes {', '.join(names)}: tumour slices {'/'.join(str(tumour[n]) for n in names)} "
          f"(total {sum(tumour.values())}), non-tumour candidate slices {'/'.join(str(nontumour[n]) for n in names)} "
          f"(total {sum(nontumour.values())})")
    print(f"    engine options: relevance_threshold {options.relevance_threshold}, relevance_smoothing "
          f"{options.relevance_smoothing}; Dice with every tumour slice (no gate, GT box +{DILATION} px, fp32): "
          f"{ceiling:.3f} mean over volumes")
    print(f"    figures: mean over {seeds} seeds [min-max over seeds]; per volume ({'/'.join(names)}): means over seeds")
    header = (f"    {'oracle':<6} {'sd':>4} {'thr':>4} {'win':>3} | {'lost slices':>16} {'lost vox %':>13} "
              f"{'non-tum sel':>13} {'Dice ceil':>9} {'(min)':>6} | {'lost slices /vol':>20} {'non-tum sel /vol':>20} {'Dice /vol':>24}")
    for title, keep in (("thresholds, smoothing window as the engine", lambda r: r["smoothing"] == options.relevance_smoothing),
                        (f"smoothing window 1 vs {options.relevance_smoothing} at threshold {options.relevance_threshold}",
                         lambda r: r["threshold"] == options.relevance_threshold)):
        print(f"\n  {title}")
        print(header)
        previous = None
        for r in filter(keep, rows):
            if previous and (r["oracle"], r["sigma"]) != previous:
                print()
            previous = (r["oracle"], r["sigma"])
            t, pv = r["total"], r["per_volume"]
            per = lambda key, fmt: "/".join(format(np.mean(pv[n][key]), fmt) for n in names)  # noqa: E731
            print(f"    {r['oracle']:<6} {r['sigma']:>4.1f} {r['threshold']:>4.1f} {r['smoothing']:>3} | "
                  f"{t['lost_slices_mean']:>6.1f} [{t['lost_slices_min']:>3}-{t['lost_slices_max']:>3}] "
                  f"{100 * t['lost_voxel_fraction_mean']:>5.2f} ({100 * t['lost_voxel_fraction_max']:>5.1f}) "
                  f"{t['nontumour_selected_mean']:>6.1f} [{t['nontumour_selected_max']:>4}] "
                  f"{t['dice_mean_over_volumes']:>9.3f} {t['dice_min_over_seeds']:>6.3f} | "
                  f"{per('lost_slices', '.1f'):>20} {per('nontumour_selected', '.1f'):>20} {per('dice', '.3f'):>24}")
    print("    lost vox %: tumour voxels on lost slices / all tumour voxels, mean (max over seeds); non-tum sel: "
          "non-tumour slices selected, total, mean [max over seeds]")


def print_precision(volumes: Dict[str, dict]) -> None:
    print("\n(2) LiteMedSAM encoder float32 vs bf16 autocast; GT box +5 px on every tumour slice; decoder float32 in both")
    print(f"    {'volume':<8} {'slices':>6} {'Dice f32':>8} {'Dice bf16':>9} {'HD95 f32':>8} {'bf16':>6} {'NSD f32':>7} {'bf16':>6} "
          f"{'f32~bf16':>8} {'px differ':>9} {'% mask':>7} {'% px':>7} {'sl diff':>7} {'med':>5} {'p95':>6} {'max':>5} "
          f"{'emb max':>8} {'emb mean':>9} {'|emb|':>7} {'cos min':>8} {'s/sl f32':>8} {'bf16':>5}")
    for name, v in volumes.items():
        s, d, e = v["scores"], v["differ_per_slice"], v["embedding"]
        print(f"    {name:<8} {v['tumour_slices']:>6} {s['float32']['dice']:>8.4f} {s['bfloat16']['dice']:>9.4f} "
              f"{s['float32']['hd95_mm']:>8.2f} {s['bfloat16']['hd95_mm']:>6.2f} {s['float32']['nsd']:>7.4f} "
              f"{s['bfloat16']['nsd']:>6.4f} {v['dice_f32_vs_bf16']:>8.4f} {v['pixels_differ']:>9} "
              f"{100 * v['pixels_differ'] / v['f32_mask_pixels']:>7.3f} {100 * v['pixels_differ'] / v['pixels_on_tumour_slices']:>7.4f} "
              f"{v['slices_with_difference']:>7} {d['median']:>5.0f} {d['p95']:>6.1f} {d['max']:>5} "
              f"{e['max_abs_diff']:>8.4f} {e['mean_abs_diff']:>9.5f} {e['mean_abs_f32']:>7.4f} {e['min_cosine']:>8.5f} "
              f"{v['encoder_s_per_slice']['float32']:>8.2f} {v['encoder_s_per_slice']['bfloat16']:>5.2f}")
    diffs = np.concatenate([v["differ_per_slice_list"] for v in volumes.values()])
    total_mask = sum(v["f32_mask_pixels"] for v in volumes.values())
    dice = {p: np.mean([v["scores"][p]["dice"] for v in volumes.values()]) for p in ("float32", "bfloat16")}
    print(f"    all: {len(diffs)} slices, Dice mean f32 {dice['float32']:.4f}, bf16 {dice['bfloat16']:.4f}; "
          f"{int(diffs.sum())} pixels differ ({100 * diffs.sum() / total_mask:.3f} % of the f32 masks' {total_mask}); "
          f"per slice median {np.median(diffs):.0f}, p95 {np.percentile(diffs, 95):.1f}, max {diffs.max()}; "
          f"{int((diffs > 0).sum())} slices differ at all")
    print("    % mask: of the f32 mask pixels; % px: of all pixels of the tumour slices; sl diff: slices with any "
          "difference; med/p95/max: pixels differing per slice; emb: |f32 - bf16| of the (256, 64, 64) embeddings")


# ---- CLIP drift (random weights) -------------------------------------------------------------------------------------

def clip_drift(case: ba.Case, options: SegmentOptions, thresholds: List[float], folder: Path) -> dict:
    """Gate relevance of a random full-size CLIP ViT-B-16 in float32 and bf16 on one volume; decision flips."""
    clip = load_clip(save_random_clip(folder / "clip_vit_b16_random", "ViT-B-16"))
    view = ba.zeroshot_view(case)
    slices = view.images[..., 0]
    candidates = np.ptp(slices.reshape(len(slices), -1), axis=1) > 0
    indices = np.flatnonzero(candidates)
    relevance, seconds = {}, {}
    for name, dtype in ba.DTYPES.items():  # as ZeroShotSegmenter.segment with clip_precision = name
        scorer = ClipScorer(clip, torch.device("cpu"), dtype)
        started = time.perf_counter()
        images = scorer.images(slices[indices])
        text, negative = scorer.prompt_embedding(case.prompt), scorer.text_embedding(options.negative_prompts)
        values = np.zeros(len(slices))
        values[indices] = scorer.relevance(scorer.image_embeddings(images), text, negative)
        relevance[name], seconds[name] = values, time.perf_counter() - started
    r32, r16 = relevance["float32"], relevance["bfloat16"]
    flips = {}
    for window in sorted({1, options.relevance_smoothing}):
        # the random model's relevance sits in a narrow band: also a threshold at the median of the float32
        # smoothed relevance over the candidates, the worst case for flips
        median = float(np.median(uniform_filter1d(r32, size=window, mode="nearest")[indices]))
        for label, threshold in [(f"thr {t}", t) for t in thresholds] + [(f"thr f32 median ({median:.4f})", median)]:
            a, b = (gate(r, candidates, threshold, window) for r in (r32, r16))
            flips[f"{label} win {window}"] = {"flips": int((a != b).sum()), "selected_f32": int(a.sum()),
                                              "selected_bf16": int(b.sum())}
    return {"volume": case.name, "candidates": int(candidates.sum()), "seconds": seconds,
            "relevance_f32_range": [float(r32[indices].min()), float(r32[indices].max())],
            "relevance_max_abs_diff": float(np.abs(r32 - r16)[indices].max()),
            "relevance_mean_abs_diff": float(np.abs(r32 - r16)[indices].mean()), "flips": flips,
            "relevance_f32": r32.round(5).tolist(), "relevance_bf16": r16.round(5).tolist()}


def print_clip(result: dict) -> None:
    print(f"\n(3) bf16 vs float32 gate relevance, RANDOM-WEIGHT CLIP ViT-B-16 (numerical drift only, NOT accuracy), "
          f"{result['volume']}, {result['candidates']} candidate slices; {result['seconds']['float32']:.0f} s f32, "
          f"{result['seconds']['bfloat16']:.0f} s bf16")
    print(f"    f32 relevance range {result['relevance_f32_range'][0]:.4f}-{result['relevance_f32_range'][1]:.4f}; "
          f"|f32 - bf16| max {result['relevance_max_abs_diff']:.4f}, mean {result['relevance_mean_abs_diff']:.4f}")
    for setting, f in result["flips"].items():
        print(f"    {setting:<34} decisions flipped {f['flips']:>3}; selected f32 {f['selected_f32']:>3}, bf16 {f['selected_bf16']:>3}")


# ---- main ----------------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    floats = lambda text: [float(x) for x in text.split(",")]  # noqa: E731
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sigmas", type=floats, default=[0.0, 0.1, 0.2, 0.3])
    parser.add_argument("--thresholds", type=floats, default=[0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--sam-batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-clip-drift", dest="clip_drift", action="store_false")
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args()
    if not ba.DATA.exists():
        sys.exit(f"needs {ba.DATA}")
    torch.set_num_threads(args.threads)
    options = SegmentOptions()
    fast = preset_options("fast")
    assert (fast.relevance_threshold, fast.relevance_smoothing) == (options.relevance_threshold, options.relevance_smoothing)
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; LiteMedSAM, batch {args.sam_batch_size}; "
          f"fast preset sam_precision {fast.sam_precision}", flush=True)
    sam = load_sam("litemedsam")
    segmenters = {name: ba.EmbeddingCache(sam, dtype, args.sam_batch_size) for name, dtype in ba.DTYPES.items()}
    cases = ba.brats_cases()
    volumes = {}
    for case in cases:
        t0 = time.perf_counter()
        volumes[case.name] = precision_volume(case, segmenters)
        v = volumes[case.name]
        print(f"  {case.name}: {v['tumour_slices']} tumour slices, axis {v['axis']}, Dice f32 {v['scores']['float32']['dice']:.4f} "
              f"bf16 {v['scores']['bfloat16']['dice']:.4f}, {v['pixels_differ']} px differ; {time.perf_counter() - t0:.0f} s",
              flush=True)
        # the Dice ceiling's per-slice counts must reproduce evaluate()'s Dice when every tumour slice is selected
        ps = v["per_slice"]
        check = 2 * ps["intersection"].sum() / (ps["predicted"].sum() + ps["truth"].sum())
        assert abs(check - v["scores"]["float32"]["dice"]) < 1e-6, (check, v["scores"]["float32"]["dice"])
    for segmenter in segmenters.values():
        segmenter.store.clear()
    rows = gate_study(volumes, args, options)
    print_gate(rows, volumes, options, args.seeds)
    print_precision(volumes)
    figures = {"settings": {k: v for k, v in vars(args).items()}, "engine_options": asdict(options),
               "gate": rows, "precision": {n: {k: val for k, val in v.items() if k != "per_slice"} for n, v in volumes.items()},
               "per_slice": {n: {k: val.tolist() for k, val in v["per_slice"].items()} for n, v in volumes.items()}}
    if args.clip_drift:
        with tempfile.TemporaryDirectory() as temporary:
            figures["clip_drift"] = clip_drift(cases[0], options, args.thresholds, Path(temporary))
        print_clip(figures["clip_drift"])
    total = time.perf_counter() - started
    figures["seconds"] = total
    print(f"\ntotal {total / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=float))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
