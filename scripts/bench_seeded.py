"""Accuracy of the seeded zero-shot mode against the every-slice mode (issue 21), with the real LiteMedSAM.

PRODUCT: `ZeroShotSegmenter.segment` with the `fast` preset (LiteMedSAM, bf16 encoder) and ``slices="auto"``: the
engine's own gate (threshold and smoothing of the preset), seed choice, coarse mask, SAM prompt, SAM, propagation,
and 3D rule. Only CLIP is replaced, by two ORACLES (no pretrained CLIP exists here), as in scripts/bench_accuracy.py
row (b) and scripts/bench_fidelity.py, whose code this reuses:
- relevance: `bench_fidelity.oracle_relevance`, "binary" (1 on the slices holding the target, 0 elsewhere) or
  "area" (the slice's target area over the largest slice's), plus white noise σ (`--sigma`), clipped to [0, 1], on
  the candidate slices; given to the gate through `OracleScorer` (one draw per volume, oracle and `--noise-seeds`);
- saliency: `bench_accuracy.perturbed_map` of the ground truth on every candidate slice (shifted by 0.15 of the
  target's diameter, blurred σ 4 px, 2 spurious blobs, noise σ 0.1; on a slice without the target, the blobs and
  noise alone: a real map always shows something), or, in the "blur only" rows, the blurred ground truth alone
  (flat, so no prompt, on a slice without the target).
Shows what the seeded mode costs or gains against the every-slice mode given a relevance and saliency of a known
quality, and how many slices get a saliency map; cannot show how good a real CLIP's relevance and saliency are.

Data: the 4 BraTS FLAIR volumes (whole tumour, "brain tumor": profile tumor), the CT organs of the 20-slice series
(liver, spleen, stomach, aorta: profile organ) and, with `--lungs`, slicerio's CTChest4 (right and left lung:
"lungs" is profile paired-organ, which the seeded mode leaves to every slice; the rows show what seeding it as one
target, or each lung on its own, would give). Scores by `clisc.metrics.evaluate` (Dice, HD95 mm, NSD at 2 mm).

    python scripts/bench_seeded.py [--datasets brats,ct] [--lungs] [--noise-seeds 1] [--sigma 0.3] [--json OUT]
                                   [--embeddings DIR] [--cases pat0001,...] [--configs 0,1] [-v]
    python scripts/bench_seeded.py --datasets brats --precompute --embeddings DIR   # the encoder's work first
    python scripts/bench_seeded.py --merge A.json,B.json                              # runs split by case
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import zlib
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from scipy import ndimage

from clisc.torchvision_compat import import_torchvision

import_torchvision()

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_accuracy as ba  # noqa: E402
import bench_fidelity as bf  # noqa: E402

from clisc.evaluate import read_mask  # noqa: E402
from clisc.models.loaders import load_sam  # noqa: E402
from clisc.propagation import dice  # noqa: E402
from clisc.readers import read_volume  # noqa: E402
from clisc.zeroshot import ZeroShotSegmenter, preset_options  # noqa: E402

# (label, SegmentOptions overrides); the defaults of the seeded mode are SegmentOptions'.
CONFIGS = (
    ("every-slice", {"mode": "every-slice"}),
    ("seeded (defaults)", {"mode": "seeded"}),
    ("seeded, 1 seed per run", {"mode": "seeded", "seed_spacing": 10_000}),
    ("seeded, spacing 40", {"mode": "seeded", "seed_spacing": 40}),
    ("seeded, spacing 10", {"mode": "seeded", "seed_spacing": 10}),
    ("seeded, margin 0", {"mode": "seeded", "propagation_margin": 0}),
    ("seeded, margin 20", {"mode": "seeded", "propagation_margin": 20}),
)
MAPS = {"perturbed": ba.Perturbation(), "blur only": ba.BLUR_ONLY}
BLUR_ONLY_CONFIGS = ("every-slice", "seeded (defaults)", "seeded (the profile decides)")


class StoredEmbeddings(ba.EmbeddingCache):
    """`bench_accuracy.EmbeddingCache` that also keeps each embedding in ``folder`` (one file per slice image and
    precision), so that runs of this script share the encoder's work."""

    def __init__(self, folder: Path, sam, autocast_dtype, batch_size: int) -> None:
        super().__init__(sam, autocast_dtype, batch_size)
        self.folder, self.tag_dtype = folder, str(autocast_dtype)
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, image: np.ndarray) -> Path:
        digest = hashlib.blake2b(image.tobytes() + bytes(str(image.shape) + self.tag_dtype, "ascii"), digest_size=16)
        return self.folder / f"{digest.hexdigest()}.pt"

    def embed(self, images: np.ndarray) -> torch.Tensor:
        for image in images:
            key = hashlib.blake2b(image.tobytes() + bytes(str(image.shape), "ascii"), digest_size=16).digest()
            if key not in self.store and self.path(image).exists():
                self.store[key] = torch.load(self.path(image), weights_only=True)
        missing = [n for n, image in enumerate(images) if not self.path(image).exists()]
        embeddings = super().embed(images)
        for n in missing:
            torch.save(embeddings[n].clone(), self.path(images[n]))
        return embeddings


class OracleScorer(ba.SliceImages):
    """A `clisc.protocols.SliceScorer` whose relevance is an oracle's: slices pass through as in
    `bench_accuracy.SliceImages`; an image's "embedding" is its slice's oracle relevance, found by its pixels."""

    def __init__(self, slices: np.ndarray, relevance: np.ndarray) -> None:
        self.values = {plane.tobytes(): float(value) for plane, value in zip(slices, relevance)}

    def text_embedding(self, texts) -> torch.Tensor:
        return torch.zeros(1)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[self.values[image[0].numpy().tobytes()]] for image in images], dtype=torch.float64)

    def relevance(self, image_embeddings: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> np.ndarray:
        return image_embeddings[:, 0].numpy()


def candidates_of(view: ba.View) -> np.ndarray:
    grey = view.images[..., 0]
    return np.ptp(grey.reshape(len(grey), -1), axis=1) > 0


def oracle_maps(case: ba.Case, view: ba.View, how: ba.Perturbation, seed: int) -> np.ndarray:
    """(N, H, W) float32: `bench_accuracy.perturbed_map` of the ground truth on every candidate slice."""
    grey = view.images[..., 0]
    maps = np.zeros(view.truth.shape, np.float32)
    for index in np.flatnonzero(candidates_of(view)):
        rng = np.random.default_rng([seed, 3, zlib.crc32(f"{case.dataset}/{case.name}".encode()), int(index)])
        maps[index] = ba.perturbed_map(view.truth[index], grey[index] > grey[index].min(), rng, how)
    return maps


def run(case: ba.Case, view: ba.View, relevance: np.ndarray, maps: np.ndarray, sam: ba.EmbeddingCache,
        overrides: dict, prompt: str) -> dict:
    """One pipeline run; scores and counts."""
    options = preset_options("fast", slices="auto", device="cpu", **overrides)
    grey = view.images[..., 0]
    pipeline = ZeroShotSegmenter(options, scorer=OracleScorer(grey, relevance), slice_sam=sam,
                                 saliency=ba.GivenSaliency(grey, maps))
    result = pipeline.segment(case.volume, [prompt])
    report = result.report
    scores = ba.score(result.masks[0], case)
    seeded = report["seeded"].get(prompt)
    return {**scores, "saliency_maps": len(report["saliency_slices"][prompt]),
            "selected": len(report["selected_slices"][prompt]), "embedded": report["slices_embedded"],
            "mode": report["mode"][prompt],
            "seeds": seeded["seeds"] if seeded else None,
            "seed_ious": seeded["seed_ious"] if seeded else None,
            "seed_dice": {i: round(dice(result.masks[0].take(int(i), axis=report["axis"]),
                                     case.truth.take(int(i), axis=report["axis"])), 3) for i in seeded["seeds"]}
            if seeded else None,
            "stops": [(d["seed"], d["direction"], d["reason"]) for d in seeded["directions"]] if seeded else None}


def lung_cases() -> List[ba.Case]:
    """slicerio's CTChest4 (128 × 128 × 34) with its right and left lung, and both as "lungs"."""
    import slicerio

    folder = Path(slicerio.__file__).parent / "data"
    image = read_volume(folder / "CTChest4.nrrd")
    lungs = {name: read_mask(folder / "Segmentation.seg.nrrd", segment=name).array for name in ("right lung", "left lung")}
    return [ba.Case("lungs", "lungs", image, lungs["right lung"] | lungs["left lung"], "lungs"),
            *(ba.Case("lungs", name, image, mask, name) for name, mask in lungs.items())]


def dataset_rows(cases: List[ba.Case], sam: ba.EmbeddingCache, args: argparse.Namespace,
                 configs=CONFIGS, extra=lambda case: ()) -> Dict[str, Dict[str, dict]]:
    """{row label: {case name / noise seed: figures}} over the oracles, maps and configurations."""
    rows: Dict[str, Dict[str, dict]] = {}
    for case in cases:
        started = time.perf_counter()
        view = ba.zeroshot_view(case)
        assert len({plane.tobytes() for plane in view.images[candidates_of(view), ..., 0]}) == candidates_of(view).sum()
        area = view.truth.reshape(len(view.truth), -1).sum(1).astype(float)
        for map_name, how in MAPS.items():
            for noise_seed in range(args.noise_seeds):
                maps = oracle_maps(case, view, how, noise_seed)
                for oracle in bf.ORACLES:
                    relevance = bf.oracle_relevance(oracle, area, candidates_of(view), args.sigma, noise_seed + 1,
                                                    case.name)[noise_seed]
                    for number, (label, overrides) in enumerate(list(configs) + list(extra(case))):
                        if args.configs and number not in args.configs:
                            continue
                        if map_name != "perturbed" and label not in BLUR_ONLY_CONFIGS:
                            continue
                        t0 = time.perf_counter()
                        figures = run(case, view, relevance, maps, sam, overrides, case.prompt)
                        row = f"{oracle} relevance, {map_name} saliency: {label}"
                        rows.setdefault(row, {})[f"{case.name}/{noise_seed}"] = figures
                        if args.verbose:
                            print(f"    {case.name} {row}: Dice {figures['dice']:.3f}, {figures['saliency_maps']} maps, "
                                  f"seeds {figures['seeds']} IoU {figures['seed_ious']} Dice {figures['seed_dice']}; "
                                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        print(f"  {case.dataset}/{case.name}: {time.perf_counter() - started:.0f} s", flush=True)
    return rows


def print_rows(title: str, rows: Dict[str, Dict[str, dict]]) -> None:
    print(f"\n{title}")
    print(f"  {'row':<74} {'n':>3} {'Dice mean':>9} {'median':>7} {'min':>6} {'HD95 mean':>9} {'NSD':>6} "
          f"{'maps/case':>9} {'sel/case':>8} {'emb/case':>8}")
    for label, cases in rows.items():
        f = list(cases.values())
        mean = lambda key: np.mean([x[key] for x in f])  # noqa: E731
        dice = [x["dice"] for x in f]
        print(f"  {label:<74} {len(f):>3} {np.mean(dice):>9.3f} {np.median(dice):>7.3f} {np.min(dice):>6.3f} "
              f"{mean('hd95_mm'):>9.1f} {mean('nsd'):>6.3f} {mean('saliency_maps'):>9.1f} {mean('selected'):>8.1f} "
              f"{mean('embedded'):>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="brats,ct", help="comma-separated, of brats,ct")
    parser.add_argument("--lungs", action="store_true", help="also slicerio's CTChest4 lungs (paired organ)")
    parser.add_argument("--noise-seeds", type=int, default=1, help="draws of the relevance and saliency noise")
    parser.add_argument("--sigma", type=float, default=0.3, help="sd of the relevance oracle's noise")
    parser.add_argument("--sam-batch-size", type=int, default=2)
    parser.add_argument("--json", metavar="OUT.json")
    parser.add_argument("--embeddings", metavar="DIR", help="keep LiteMedSAM's embeddings in DIR (shared by runs)")
    parser.add_argument("--cases", help="only these case names (comma-separated)")
    parser.add_argument("--precompute", action="store_true",
                        help="only embed each case's slices within 12 of its target into --embeddings, then stop")
    parser.add_argument("--configs", type=lambda text: [int(x) for x in text.split(",")],
                        help="only these rows of CONFIGS, by number from 0 (default all)")
    parser.add_argument("--merge", metavar="A.json,B.json", help="print the tables of earlier runs' --json together")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each run's Dice")
    args = parser.parse_args()
    if args.merge:
        merged: Dict[str, Dict[str, Dict[str, dict]]] = {}
        for path in args.merge.split(","):
            for dataset, rows in json.loads(Path(path).read_text()).items():
                for label, cases in rows.items() if dataset != "settings" else ():
                    merged.setdefault(dataset, {}).setdefault(label, {}).update(cases)
        for dataset, rows in merged.items():
            print_rows(dataset, rows)
        return
    if not ba.DATA.exists():
        sys.exit(f"needs {ba.DATA}")
    torch.manual_seed(0)
    fast = preset_options("fast")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; LiteMedSAM encoder {fast.sam_precision}; "
          f"gate threshold {fast.relevance_threshold}, smoothing {fast.relevance_smoothing}; relevance noise σ "
          f"{args.sigma}; seeded defaults: spacing {fast.seed_spacing}, margin {fast.propagation_margin}", flush=True)
    sam_model, dtype = load_sam("litemedsam"), ba.DTYPES[fast.sam_precision]
    sam = (StoredEmbeddings(Path(args.embeddings), sam_model, dtype, args.sam_batch_size) if args.embeddings
           else ba.EmbeddingCache(sam_model, dtype, args.sam_batch_size))
    figures = {"settings": vars(args)}
    loaders = {"brats": (ba.brats_cases, "BraTS FLAIR whole tumour (4 volumes)"),
               "ct": (lambda: ba.ct_cases({}), "CT organs: liver, spleen, stomach, aorta (20 slices)")}
    for dataset in args.datasets.split(","):
        started = time.perf_counter()
        loader, title = loaders[dataset]
        cases = [case for case in loader() if not args.cases or case.name in args.cases.split(",")]
        if args.precompute:
            for case in cases:
                view = ba.zeroshot_view(case)
                near = np.flatnonzero(ndimage.binary_dilation(view.truth.any(axis=(1, 2)), iterations=12)
                                      & candidates_of(view))
                for start in range(0, len(near), 8):
                    sam.embed(view.images[near[start:start + 8]])
                print(f"  {case.name}: {len(near)} slices embedded or found", flush=True)
            continue
        rows = dataset_rows(cases, sam, args)
        sam.store.clear()
        print_rows(f"{title}; {time.perf_counter() - started:.0f} s", rows)
        figures[dataset] = rows
    if args.lungs:
        cases = lung_cases()
        lung_configs = (("every-slice", {"mode": "every-slice"}), ("seeded (the profile decides)", {"mode": "seeded"}))
        forced = lambda case: ((("seeded as one target (one box spanning both)", {  # noqa: E731
            "mode": "seeded", "components": 1, "box_per_component": False}),) if case.name == "lungs" else ())
        rows = dataset_rows(cases, sam, args, lung_configs, forced)
        print_rows("CTChest4 lungs (slicerio): 'lungs' (paired-organ profile), 'right lung', 'left lung' (organ)", rows)
        figures["lungs"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=float))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
