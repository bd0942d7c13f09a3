"""Interactive refinement (`clisc.refine`) with the real LiteMedSAM on ../shared/data: clicks, propagation, latency.

Clicks. The standard simulated user (`clisc.refine.simulated_click`; Xu et al. 2016, RITM, SAM's interactive
evaluation): each click goes to the pixel farthest from the edge of the errors (the maximum of the distance
transform of the missed region and of the false region, the image border counting as edge), positive when that
pixel was missed, negative when it was falsely included; every click of the slice so far is given to
`Refiner.refine`. Each slice starts from its ground truth perturbed four ways (D = equivalent diameter
sqrt(4 area / pi) px, r = max(2, 0.15 D)): eroded by a disc of radius r, dilated by r, shifted by 0.2 D in a random direction, and with a blob missing
(a disc of radius 0.35 D around a random target pixel removed). "0 clicks" is the perturbed mask itself.
Configurations (prompt mode / mask input, see `clisc.refine.Refiner`; --configs to choose): box+points / mask
(the default: the box of the mask from before the first click, grown to hold the positive clicks, plus every
click as a point; SAM's own logits of the slice's last click as mask input, or the current mask as logits before
the first), box / mask (the box edited by the clicks, no points: what a box-trained SAM was trained on),
box+points / previous (SAM's logits only), box+points / none, points / mask.

Sample (--sample B,U,C, default 2,2,2; clicks and propagation took 10 + 25 minutes on the 2-core build machine
shared with 3 other jobs): BraTS pat0001 FLAIR, B axial tumour slices evenly spaced inside the tumour's slice
range (whole tumour, label > 0; 2: the 33 and 67 % points); the first U BUSI lesion images (benign then
malignant, sorted by name); CT: slice 10 of the 20-slice DICOM series, the first C organs of liver, spleen,
kidneys, stomach, aorta with >= 300 px there (reference_seg moved onto the CT grid by SimpleITK nearest-neighbour resampling: same voxel centres), seen in a
soft-tissue window (level 40, width 400 HU).
BraTS and BUSI are seen as the zero-shot pipeline sees them (`percentile_window_uint8`).

Propagation. From the ground-truth middle slice of the tumour (pat0001, and --propagation-cases), both ways,
with and without previous logits, with and without the centroid/shrink points; run with no stop rule to 3
slices past the tumour's ends, recording SAM's predicted IoU and the Dice with the previous slice at each step,
then every (min_iou, min_overlap) pair of a small grid is applied to those records (stopping only cuts the run
short, so the records decide exactly what each rule would have kept). Printed: 3D Dice against the
whole tumour and the slice range covered against the tumour's.

Latency: seconds per click with a cached embedding (the prompt encoder, mask decoder and post-processing) and
one embedding (uncached), for LiteMedSAM and a full-size random-weight SAM vit_b (its timing is real, its
masks meaningless). No accuracy for vit_b: no pretrained SAM but LiteMedSAM can be had here.

    python scripts/bench_refine.py [--json OUT] [--parts clicks,propagation,latency,vit_b] [--sample 2,2,2]
                                   [--configs box+points/mask,box/mask] [--propagation-cases pat0001,pat0002]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from clisc.models.loaders import load_sam
from clisc.readers import read_volume
from clisc.refine import EmbeddingCache, Refiner, dice, simulated_click
from clisc.sam import SliceSegmenter
from clisc.torchvision_compat import import_torchvision

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CT_ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "aorta")
CT_SLICE = 10
PERTURBATIONS = ("eroded", "dilated", "shifted", "blob missing")
CLICKS = (0, 1, 3, 5)
CONFIGS = [("box+points", "mask"), ("box", "mask"), ("box+points", "previous"), ("box+points", "none"),
           ("points", "mask")]
THRESHOLDS_IOU = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7)
THRESHOLDS_OVERLAP = (0.0, 0.2, 0.3, 0.5)


def disc(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= radius * radius


def perturb(truth: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """The ground-truth slice (H, W) bool perturbed as the module docstring says."""
    diameter = np.sqrt(4 * truth.sum() / np.pi)
    r = max(2.0, 0.15 * diameter)
    if kind == "eroded":
        out = ndimage.binary_erosion(truth, disc(r))
        return out if out.any() else ndimage.binary_erosion(truth)
    if kind == "dilated":
        return ndimage.binary_dilation(truth, disc(r))
    if kind == "shifted":
        angle = rng.uniform(0, 2 * np.pi)
        return ndimage.shift(truth.astype(np.uint8), 0.2 * diameter * np.array([np.sin(angle), np.cos(angle)]),
                             order=0) > 0
    rows, cols = np.nonzero(truth)
    pick = rng.integers(len(rows))
    y, x = np.ogrid[:truth.shape[0], :truth.shape[1]]
    hole = (y - rows[pick]) ** 2 + (x - cols[pick]) ** 2 <= (0.35 * diameter) ** 2
    return truth & ~hole


def simulate(refiner: Refiner, index: int, truth: np.ndarray, start: np.ndarray, clicks: int) -> tuple:
    """Dice after 0..clicks clicks and the seconds of each refine call."""
    volume_mask = np.zeros(refiner.volume.array.shape, dtype=bool)
    refiner.slice_of(volume_mask, index)[...] = start
    current, points, labels, scores, seconds = start, [], [], [dice(start, truth)], []
    for _ in range(clicks):
        click = simulated_click(truth, current)
        if click is None:
            scores.append(scores[-1])
            continue
        points.append(click[0])
        labels.append(click[1])
        started = time.perf_counter()
        result = refiner.refine(volume_mask, index, points=np.array(points), labels=np.array(labels))
        seconds.append(time.perf_counter() - started)
        current = result.mask
        refiner.slice_of(volume_mask, index)[...] = current
        scores.append(dice(current, truth))
    return scores, seconds


# ---- data ---------------------------------------------------------------------------------------------------

def ct_window(array: np.ndarray, level: float = 40.0, width: float = 400.0) -> np.ndarray:
    return (np.clip((array - (level - width / 2)) / width, 0, 1) * 255).round().astype(np.uint8)


def click_cases(brats_slices: int, busi_images: int, ct_organs: int) -> list:
    """(dataset, name, volume, truth (K, J, I), slice index, view or None)."""
    import SimpleITK as sitk

    cases = []
    folder = DATA / "brats2015" / "pat0001"
    volume, truth = read_volume(folder / "flair.nii.gz"), read_volume(folder / "label.nii.gz").array > 0
    slices = np.flatnonzero(truth.any((1, 2)))
    for q in np.linspace(0, 1, brats_slices + 2)[1:-1]:
        index = int(slices[int(round(q * (len(slices) - 1)))])
        cases.append(("brats", f"pat0001 k={index}", volume, truth, index, None))
    lesions = [p for p in sorted((DATA / "busi").glob("*/*.png")) if "_mask" not in p.name and "normal" not in p.parts[-2]]
    for image in lesions[:busi_images]:
        masks = [read_volume(p).array > 0 for p in sorted(image.parent.glob(image.stem + "_mask*.png"))]
        cases.append(("busi", image.stem, read_volume(image), np.logical_or.reduce(masks), 0, None))
    ct = read_volume(DATA / "ct_dicom" / "series")
    labels_image = sitk.ReadImage(str(DATA / "ct_dicom" / "reference_seg.nii.gz"))
    labels = sitk.GetArrayFromImage(sitk.Resample(labels_image, ct.to_sitk(), sitk.Transform(),
                                                  sitk.sitkNearestNeighbor, 0))
    names = {name: int(value) for value, name in
             json.loads((DATA / "ct_dicom" / "labels_total.json").read_text())["total"].items()}
    view = ct_window(ct.array)
    organs = [organ for organ in CT_ORGANS if (labels[CT_SLICE] == names[organ]).sum() >= 300]
    for organ in organs[:ct_organs]:
        cases.append(("ct", f"{organ} k={CT_SLICE}", ct, labels == names[organ], CT_SLICE, view))
    return cases


# ---- parts --------------------------------------------------------------------------------------------------

def click_benchmark(segmenter: SliceSegmenter, cache: EmbeddingCache, report: dict, sample: tuple) -> None:
    rng_seed = 0
    results = {config: {} for config in CONFIGS}
    click_seconds, embed_seconds = [], []
    cases = click_cases(*sample)
    report["click_sample"] = [f"{d} {n}" for d, n, *_ in cases]
    for dataset, name, volume, truth, index, view in cases:
        refiners = {config: Refiner(segmenter, volume, axis=0, cache=cache, prompt_mode=config[0],
                                    mask_input=config[1], view=view) for config in CONFIGS}
        started = time.perf_counter()
        missing = refiners[CONFIGS[0]]._key + (index,) not in cache
        refiners[CONFIGS[0]].embedding(index)
        if missing:
            embed_seconds.append(time.perf_counter() - started)
        truth_slice = truth[index]
        for p, kind in enumerate(PERTURBATIONS):
            start = perturb(truth_slice, kind, np.random.default_rng([rng_seed, p, index, len(name)]))
            for config, refiner in refiners.items():
                scores, seconds = simulate(refiner, index, truth_slice, start, max(CLICKS))
                click_seconds.extend(seconds)
                results[config].setdefault(dataset, []).append([scores[c] for c in CLICKS])
        print(f"  {dataset} {name}: done", flush=True)
    table = {}
    print(f"\nDice after {', '.join(map(str, CLICKS))} clicks (mean over slices x {len(PERTURBATIONS)} perturbations)")
    print(f"{'prompt mode':<12} {'mask input':<10} " + " ".join(f"{d + ' ' + str(c):>9}" for d in ("brats", "busi", "ct")
                                                             for c in CLICKS))
    for config in CONFIGS:
        row = {d: np.mean(v, axis=0).round(4).tolist() for d, v in results[config].items()}
        table[f"{config[0]} / {config[1]}"] = row
        print(f"{config[0]:<12} {config[1]:<10} " + " ".join(f"{x:>9.3f}" for d in ("brats", "busi", "ct")
                                                             for x in row.get(d, [np.nan] * len(CLICKS))))
    by_kind = {}
    for config in CONFIGS:
        for dataset, rows in results[config].items():
            for n, scores in enumerate(rows):
                by_kind.setdefault(f"{config[0]} / {config[1]}", {}).setdefault(PERTURBATIONS[n % len(PERTURBATIONS)],
                                                                           []).append(scores)
    report["clicks"] = {"clicks": list(CLICKS), "mean_dice": table,
                        "by_perturbation": {c: {k: np.mean(v, axis=0).round(4).tolist() for k, v in kinds.items()}
                                            for c, kinds in by_kind.items()},
                        "worst_slice_after_5": {f"{c[0]} / {c[1]}": {d: float(np.min(np.array(v)[:, -1]))
                                                                     for d, v in results[c].items()} for c in CONFIGS}}
    report["latency_litemedsam"] = {"seconds_per_click_cached": float(np.mean(click_seconds)),
                                    "seconds_per_click_median": float(np.median(click_seconds)),
                                    "seconds_per_embedding": float(np.mean(embed_seconds)) if embed_seconds else None,
                                    "clicks_timed": len(click_seconds)}


def propagation_benchmark(segmenter: SliceSegmenter, cache: EmbeddingCache, cases: list, report: dict) -> None:
    report["propagation"] = {}
    for case in cases:
        folder = DATA / "brats2015" / case
        volume, truth = read_volume(folder / "flair.nii.gz"), read_volume(folder / "label.nii.gz").array > 0
        slices = np.flatnonzero(truth.any((1, 2)))
        first, last = int(slices[0]), int(slices[-1])
        middle = int(slices[len(slices) // 2])
        start = np.zeros_like(truth)
        start[middle] = truth[middle]
        margin = 3
        runs = {}
        for use_points in (False, True):
            for source in ("previous", "none"):
                refiner = Refiner(segmenter, volume, axis=0, cache=cache, mask_input=source, min_iou=0.0,
                                  min_overlap=0.0)
                started = time.perf_counter()
                up = refiner.propagate(start, middle, "up", max_slices=last - middle + margin, use_points=use_points)
                down = refiner.propagate(start, middle, "down", max_slices=middle - first + margin,
                                         use_points=use_points)
                seconds = time.perf_counter() - started
                runs[(use_points, source)] = (up, down, seconds)
        print(f"\nPropagation, {case}: tumour slices {first}..{last} ({last - first + 1}), start {middle}")
        print(f"{'points':<7} {'mask input':<10} {'min_iou':>7} {'min_ovl':>7} {'Dice 3D':>8} {'range':>11} {'s':>6}")
        case_report = {"tumour_slices": [first, last], "start": middle, "runs": {}}
        for (use_points, source), (up, down, seconds) in runs.items():
            key = f"points={use_points} / {source}"
            case_report["runs"][key] = {"seconds": round(seconds, 1), "up": vars(up.reports["up"]),
                                        "down": vars(down.reports["down"]), "rules": {}}
            for min_iou in THRESHOLDS_IOU:
                for min_overlap in THRESHOLDS_OVERLAP:
                    mask = start.copy()
                    covered = [middle]
                    for run, report_ in ((up, up.reports["up"]), (down, down.reports["down"])):
                        step = 1 if report_.direction == "up" else -1
                        for n, (iou, overlap) in enumerate(zip(report_.ious, report_.overlaps)):
                            target = middle + step * (n + 1)
                            if not run.mask[target].any() or iou < min_iou or overlap < min_overlap:
                                break
                            mask[target] = run.mask[target]
                            covered.append(target)
                    score = dice(mask, truth)
                    case_report["runs"][key]["rules"][f"{min_iou}/{min_overlap}"] = {
                        "dice": round(score, 4), "range": [min(covered), max(covered)]}
                    if (min_iou, min_overlap) in ((0.0, 0.0), (0.5, 0.3), (0.6, 0.3), (0.5, 0.5)):
                        print(f"{str(use_points):<7} {source:<10} {min_iou:>7} {min_overlap:>7} {score:>8.3f} "
                              f"{min(covered):>5}..{max(covered):<5} {seconds:>6.1f}")
        report["propagation"][case] = case_report


def latency(segmenter: SliceSegmenter, key: str, report: dict, clicks: int = 5) -> None:
    """One uncached embedding and ``clicks`` clicks on it (a BraTS slice, eroded start), timed."""
    folder = DATA / "brats2015" / "pat0001"
    volume, truth = read_volume(folder / "flair.nii.gz"), read_volume(folder / "label.nii.gz").array > 0
    index = int(np.flatnonzero(truth.any((1, 2)))[30])
    refiner = Refiner(segmenter, volume, axis=0, cache=EmbeddingCache(4))
    started = time.perf_counter()
    refiner.embedding(index)
    embed = time.perf_counter() - started
    _, seconds = simulate(refiner, index, truth[index], perturb(truth[index], "eroded", np.random.default_rng(0)),
                          clicks)
    report[key] = {"seconds_per_embedding": embed, "seconds_per_click_cached": float(np.mean(seconds)),
                   "seconds_per_click_min": float(np.min(seconds)), "prompt_mode": refiner.prompt_mode,
                   "load_average": list(os.getloadavg())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--propagation-cases", default="pat0001")
    parser.add_argument("--parts", default="clicks,propagation,latency,vit_b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", help="prompt mode/mask input pairs, comma separated (default: all five)")
    parser.add_argument("--sample", default="2,2,2", help="BraTS slices, BUSI lesion images, CT organs (clicks)")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"{DATA} is absent: nothing to measure", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    import_torchvision()
    parts = args.parts.split(",")
    if args.configs:
        CONFIGS[:] = [tuple(pair.split("/")) for pair in args.configs.split(",")]
    segmenter = SliceSegmenter(load_sam("litemedsam"))
    cache = EmbeddingCache(256)  # every slice of the sample stays cached (256 x 4 MiB = 1 GiB at most)
    report = {"torch_threads": args.threads, "cache_slices": cache.max_slices, "sample": args.sample,
              "load_average_at_start": list(os.getloadavg())}
    started = time.perf_counter()
    if "clicks" in parts:
        click_benchmark(segmenter, cache, report, tuple(int(n) for n in args.sample.split(",")))
    if "propagation" in parts:
        propagation_benchmark(segmenter, cache, args.propagation_cases.split(","), report)
    if "latency" in parts:
        latency(segmenter, "latency_litemedsam_alone", report, clicks=20)
    if "vit_b" in parts:
        from clisc.models.sam_builders import build_sam

        latency(SliceSegmenter(build_sam("vit_b").eval()), "latency_vit_b_random", report)
    for key in ("latency_litemedsam", "latency_litemedsam_alone", "latency_vit_b_random"):
        if key in report:
            print(f"\n{key}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in report[key].items()))
    report["seconds_total"] = round(time.perf_counter() - started, 1)
    report["load_average_at_end"] = list(os.getloadavg())
    print(f"\ntotal {report['seconds_total']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
