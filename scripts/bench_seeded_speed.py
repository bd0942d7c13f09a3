"""Speed of `clisc segment --preset fast` on a whole BraTS volume: the seeded mode against the every-slice mode,
interleaved in one run, stage by stage, with the FLOP bound of the work each did (issue 21).

Each run is the real command line (`clisc.cli.main`, in this process, with ``--mode seeded`` or ``--mode
every-slice``) on pat0001's FLAIR (240 × 240 × 155), with a RANDOM-WEIGHT full-size CLIP ViT-B-16 (``--clip
FOLDER``) and LiteMedSAM. Random weights give timings, not masks, so two ORACLES are slipped in after the real
work has been done (its time counted):
- relevance: after the image tower has embedded every candidate slice, `ClipScorer.relevance` returns the binary
  ground-truth relevance plus noise σ 0.3 (`bench_fidelity.oracle_relevance`), so the gate keeps a realistic
  60-80 slices;
- saliency: after M2IB has run on a slice (10 steps × 10 noise samples, the preset's), its map is replaced by
  the perturbed ground truth (`bench_accuracy.perturbed_map`), so that SAM's boxes, and so how far propagation
  goes, are those of a plausible map.
Before the timed runs, each model is exported once for the runtime (OpenVINO by default), into a temporary
CLISC_HOME, so the runs measure a later run's cost (reading the export, compiling it, checking it on its probe),
as a user's every run after the first; the export's own seconds are printed apart.

Printed per run: the load average before and after, each stage's seconds (relevance, saliency, SAM, propagation;
"other": reading, writing and the rest), within them the models' preparation (loading the weights; each runtime
forward's preparation: hashing the weights, reading and compiling the export, the probe check), the slices that
got a map and were embedded, and the FLOP bound of the work done: CLIP's image tower on every candidate, M2IB on
each mapped slice (the blocks after its bottleneck, which start from the relevance pass's kept tokens), LiteMedSAM's
encoder on each embedded slice and its decoder on each prediction, counted by `torch.utils.flop_counter` on one
slice each, over this machine's measured bf16 (and fp32) matrix-multiply throughput.

A run is MODE or MODE:RUNTIME in ``--order``; the runtime defaults to ``--runtime`` (auto). The old `fast` preset
(before issue 21) is ``every-slice:torch``: the every-slice mode in PyTorch; it still gets M2IB's kept tokens,
which the old preset did not have, so the ratio to it is a lower bound.

    python scripts/bench_seeded_speed.py [--order seeded,every-slice:torch,seeded] [--threads 2] [--runtime auto]
    python scripts/bench_seeded_speed.py --crop 55:84 --m2ib 2,2 --order seeded,every-slice:torch   # a short check
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zlib
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from clisc.torchvision_compat import import_torchvision

import_torchvision()

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_accuracy as ba  # noqa: E402
import bench_fidelity as bf  # noqa: E402
from bench_zeroshot import matmul_gflops  # noqa: E402

from clisc import cli  # noqa: E402
from clisc.clip_scoring import ClipScorer  # noqa: E402
from clisc.models.loaders import load_clip, load_sam  # noqa: E402
from clisc.models.random_weights import save_random_clip  # noqa: E402
from clisc.readers import read_volume  # noqa: E402
from clisc.saliency import ClipSaliency  # noqa: E402
from clisc.volume import Volume  # noqa: E402
from clisc.writers import write_volume  # noqa: E402
from clisc.zeroshot import PRESETS, percentile_window_uint8, preset_options  # noqa: E402

CASE = ba.DATA / "brats2015" / "pat0001"
PROMPT = "brain tumor"


class Oracles:
    """The two oracles, patched into `ClipScorer.images`, `ClipScorer.relevance` and `ClipSaliency.__call__`;
    each original runs first (its time is the product's), then its output is replaced. Counts the candidate
    slices scored and the maps made."""

    def __init__(self, volume: Volume, truth: np.ndarray, sigma: float) -> None:
        slices = percentile_window_uint8(volume.array)  # axis 0: BraTS is axial
        self.candidates = np.ptp(slices.reshape(len(slices), -1), axis=1) > 0
        area = truth.reshape(len(truth), -1).sum(1).astype(float)
        self.relevance = bf.oracle_relevance("binary", area, self.candidates, sigma, 1, CASE.name)[0]
        self.maps = np.stack([ba.perturbed_map(t, s > s.min(), np.random.default_rng([0, 4, zlib.crc32(CASE.name.encode()), k]))
                              if c else np.zeros(t.shape, np.float32)
                              for k, (t, s, c) in enumerate(zip(truth, slices, self.candidates))])
        self.inputs = None
        self.scored = self.mapped = 0
        self.images, self.score, self.saliency = ClipScorer.images, ClipScorer.relevance, ClipSaliency.__call__

    def patches(self) -> list:
        oracles = self

        def images(scorer, slices):
            inputs = oracles.images(scorer, slices)
            if len(inputs) == oracles.candidates.sum():  # the candidates, in slice order
                oracles.inputs = inputs
            return inputs

        def relevance(scorer, embeddings, positive, negative):
            oracles.score(scorer, embeddings, positive, negative)
            oracles.scored += len(embeddings)
            return oracles.relevance[oracles.candidates]

        def saliency(method, images, texts, beta):
            maps = oracles.saliency(method, images, texts, beta)
            oracles.mapped += len(images)
            rows = [int(np.flatnonzero([torch.equal(image, row) for row in oracles.inputs])[0]) for image in images]
            indices = np.flatnonzero(oracles.candidates)[rows]
            side = maps.shape[-1]
            given = torch.as_tensor(oracles.maps[indices])[:, None]
            return F.interpolate(given, size=(side, side), mode="bilinear", align_corners=False)[:, 0]

        return [mock.patch.object(ClipScorer, "images", images), mock.patch.object(ClipScorer, "relevance", relevance),
                mock.patch.object(ClipSaliency, "__call__", saliency)]


def flops(function) -> float:
    """FLOPs of ``function()`` by `torch.utils.flop_counter` (forward and backward where it runs both)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        function()
    return float(counter.get_total_flops())


def unit_flops(clip_folder: Path, volume: Volume, m2ib: dict) -> dict:
    """FLOPs of one slice through each model, as the fast preset runs it (bf16 autocast where it applies)."""
    from clisc.sam import SliceSegmenter

    clip = load_clip(clip_folder)
    scorer = ClipScorer(clip, torch.device("cpu"), torch.bfloat16)
    middle = len(volume.array) // 2
    image = scorer.images(percentile_window_uint8(volume.array)[middle:middle + 1])
    text = scorer.prompt_embedding(PROMPT)[None]
    saliency = ClipSaliency("m2ib", clip.model, m2ib, torch.bfloat16, scorer.kept_tokens)
    sam = SliceSegmenter(load_sam("litemedsam"), torch.bfloat16)
    slice_rgb = np.repeat(percentile_window_uint8(volume.array)[middle:middle + 1, ..., None], 3, axis=-1)
    embedding = sam.embed(slice_rgb)[0]
    with torch.no_grad():  # not inference_mode: M2IB trains on the tokens this pass keeps
        relevance = flops(lambda: scorer.image_embeddings(image))  # keeps the tokens M2IB starts from, as a run
    return {"clip_image_tower": relevance, "m2ib_map": flops(lambda: saliency(image, text, 2.0)),
            "sam_encoder": flops(lambda: sam.embed(slice_rgb)),
            "sam_decoder": flops(lambda: sam.predict_logits(embedding, slice_rgb.shape[1:3],
                                                            box=np.array([80.0, 80, 160, 160])))}


class Preparation:
    """Seconds spent loading the models and preparing each runtime forward (`clisc.runtime.module_forward`:
    hashing the weights, reading and compiling the export, the probe check), by patching their callers' names."""

    TARGETS = (("clisc.zeroshot.segmenter", "load_clip", "loading"), ("clisc.zeroshot.segmenter", "load_sam", "loading"),
               ("clisc.clip_scoring", "module_forward", "clip_runtime"), ("clisc.sam", "module_forward", "sam_runtime"))

    def __init__(self) -> None:
        self.seconds = {"loading": 0.0, "clip_runtime": 0.0, "sam_runtime": 0.0}

    def patches(self) -> list:
        import importlib

        patches = []
        for module_name, name, kind in self.TARGETS:
            module = importlib.import_module(module_name)
            patches.append(mock.patch.object(module, name, self.timed(getattr(module, name), kind)))
        return patches

    def timed(self, function, kind: str):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[kind] += time.perf_counter() - started
        return wrapper


def one_run(spec: str, source: Path, clip_folder: Path, folder: Path, oracles: Oracles, threads: int,
            default_runtime: str) -> dict:
    mode, _, runtime = spec.partition(":")
    runtime = runtime or default_runtime
    report_path = folder / f"report_{mode}_{time.monotonic_ns()}.json"
    argv = ["segment", str(source), "--prompt", PROMPT, "--preset", "fast", "--mode", mode, "--clip", str(clip_folder),
            "--device", "cpu", "--runtime", runtime, "-o", str(folder / f"out_{report_path.stem}.nii.gz"),
            "--report", str(report_path)]
    oracles.scored = oracles.mapped = 0
    preparation = Preparation()
    load_before = os.getloadavg()
    started = time.perf_counter()
    with ExitStack() as stack:
        for patch in oracles.patches() + preparation.patches():
            stack.enter_context(patch)
        code = cli.main(argv)
    total = time.perf_counter() - started
    if code:
        sys.exit(f"clisc {' '.join(argv)} exited {code}")
    report = json.loads(report_path.read_text())
    seeded = report["seeded"].get(PROMPT)
    return {"run": spec, "mode": mode, "runtime": runtime, "total_s": total, "seconds": report["seconds"],
            "preparation_s": preparation.seconds, "runtimes": report["runtimes"], "load_before": load_before,
            "load_after": os.getloadavg(), "scored": oracles.scored, "mapped": oracles.mapped,
            "selected": len(report["selected_slices"][PROMPT]), "embedded": report["slices_embedded"],
            "predictions": (seeded["slices_visited"] + len(seeded["seeds"]) if seeded
                            else len(report["sam_prompts"][PROMPT])),
            "threads": threads}


def export_once(clip_folder: Path, runtime: str, m2ib: dict) -> dict:
    """Export CLIP's tower and LiteMedSAM's encoder and box decoder for ``runtime`` as the runs will ask for them
    (the first run's cost, paid once per model and runtime version); their describe()."""
    from clisc.sam import SliceSegmenter

    scorer = ClipScorer(load_clip(clip_folder), torch.device("cpu"), torch.bfloat16, runtime)
    ClipSaliency("m2ib", scorer.model, m2ib, torch.bfloat16, scorer.kept_tokens)  # sets the layer whose tokens are kept
    scorer.image_embeddings(scorer.images(np.zeros((1, 8, 8), np.uint8)))
    sam = SliceSegmenter(load_sam("litemedsam"), torch.bfloat16, runtime=runtime)
    embedding = sam.embed(np.zeros((1, 8, 8, 3), np.uint8))[0]
    sam.predict_logits(embedding, (8, 8), box=np.array([1.0, 1, 6, 6]))
    ran = {"clip_tower": scorer.tower_runtime(), "sam_encoder": sam.encoder_runtime(),
           "sam_decoder": sam.decoder_runtime()}
    return {name: description for name, description in ran.items() if description is not None}


def bound_seconds(run: dict, unit: dict, gflops: float) -> dict:
    work = {"relevance": run["scored"] * unit["clip_image_tower"], "saliency": run["mapped"] * unit["m2ib_map"],
            "sam": run["embedded"] * unit["sam_encoder"] + run["predictions"] * unit["sam_decoder"]}
    return {stage: value / 1e9 / gflops for stage, value in work.items()} | {"gflop": sum(work.values()) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--order", default="seeded,every-slice:torch,seeded",
                        help="the runs, in order: MODE or MODE:RUNTIME (every-slice:torch is the old fast preset)")
    parser.add_argument("--runtime", default="auto", help="CPU runtime of the runs that name none (clisc --runtime)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sigma", type=float, default=0.3, help="noise of the relevance oracle")
    parser.add_argument("--crop", metavar="FIRST:LAST", help="a shorter check: only these slices of the volume")
    parser.add_argument("--m2ib", metavar="STEPS,SAMPLES", help="a shorter check: M2IB's steps and noise samples")
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args()
    if not CASE.exists():
        sys.exit(f"needs {CASE}")
    torch.set_num_threads(args.threads)
    m2ib = dict(PRESETS["fast"]["saliency_options"])
    if args.m2ib:
        m2ib = dict(zip(("steps", "samples"), (int(x) for x in args.m2ib.split(","))))
    volume = read_volume(CASE / "flair.nii.gz")
    truth = read_volume(CASE / "label.nii.gz").array > 0
    fast = preset_options("fast")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}; fast preset: "
          f"default mode {fast.mode}, CLIP {fast.clip_precision}, SAM {fast.sam} {fast.sam_precision}, M2IB {m2ib}",
          flush=True)
    with tempfile.TemporaryDirectory() as temporary, mock.patch.dict(PRESETS["fast"], saliency_options=m2ib), \
            mock.patch.dict(os.environ, CLISC_HOME=str(Path(temporary) / "clisc_home")):
        folder = Path(temporary)
        source = CASE / "flair.nii.gz"
        if args.crop:
            first, last = (int(x) for x in args.crop.split(":"))
            shift = np.eye(4)
            shift[2, 3] = first
            volume = Volume(np.ascontiguousarray(volume.array[first:last + 1]), volume.ijk_to_ras @ shift)
            truth = truth[first:last + 1]
            source = folder / "crop.nii.gz"
            write_volume(source, volume, volume.array)
        clip_folder = save_random_clip(folder / "clip_vit_b16_random", "ViT-B-16")
        oracles = Oracles(volume, truth, args.sigma)
        gflops = {"bfloat16": matmul_gflops(torch.bfloat16), "float32": matmul_gflops(torch.float32)}
        unit = unit_flops(clip_folder, volume, m2ib)
        print(f"matmul throughput: bf16 {gflops['bfloat16']:.0f} GFLOP/s, fp32 {gflops['float32']:.0f} GFLOP/s; "
              f"GFLOP per slice: CLIP image tower {unit['clip_image_tower'] / 1e9:.1f}, M2IB map "
              f"{unit['m2ib_map'] / 1e9:.0f}, LiteMedSAM encoder {unit['sam_encoder'] / 1e9:.1f}, decoder "
              f"{unit['sam_decoder'] / 1e9:.2f}", flush=True)
        runtimes = {spec.partition(":")[2] or args.runtime for spec in args.order.split(",")} - {"torch"}
        for runtime in sorted(runtimes):
            started = time.perf_counter()
            exported = export_once(clip_folder, runtime, m2ib)
            print(f"export for --runtime {runtime} (once per model and runtime version; not in the runs): "
                  f"{time.perf_counter() - started:.1f} s: " + "; ".join(
                      f"{name} {ran['runtime']} {ran.get('precision')}, export {ran.get('export_seconds')} s"
                      for name, ran in exported.items()), flush=True)
        runs = []
        for spec in args.order.split(","):
            run = one_run(spec, source, clip_folder, folder, oracles, args.threads, args.runtime)
            run["bound_bf16_s"] = bound_seconds(run, unit, gflops["bfloat16"])
            run["bound_fp32_s"] = bound_seconds(run, unit, gflops["float32"])
            runs.append(run)
            s, b = run["seconds"], run["bound_bf16_s"]
            other = run["total_s"] - sum(s.values())
            prep = run["preparation_s"]
            print(f"\n{spec} (--runtime {run['runtime']}): total {run['total_s']:.1f} s (load average "
                  f"{run['load_before'][0]:.2f} before, "
                  f"{run['load_after'][0]:.2f} after); {volume.array.shape[0]} slices, {run['scored']} scored by CLIP, "
                  f"{run['selected']} selected, {run['mapped']} saliency maps, {run['embedded']} embedded by SAM, "
                  f"{run['predictions']} SAM predictions", flush=True)
            print(f"  {'stage':<12} {'seconds':>8} {'bf16 FLOP bound':>16}")
            for stage, bound in (("relevance", b["relevance"]), ("saliency", b["saliency"]), ("sam", None),
                                 ("propagation", None)):
                print(f"  {stage:<12} {s.get(stage, 0.0):>8.1f} " + (f"{bound:>16.1f}" if bound is not None else ""))
            print(f"  {'SAM + prop.':<12} {s.get('sam', 0) + s.get('propagation', 0):>8.1f} {b['sam']:>16.1f}")
            print(f"  {'other':<12} {other:>8.1f}   (reading, loading the models, writing)")
            print(f"  of which preparing the models: loading {prep['loading']:.1f} s (in other), CLIP's runtime "
                  f"{prep['clip_runtime']:.1f} s (in relevance), LiteMedSAM's runtime {prep['sam_runtime']:.1f} s "
                  f"(in sam); ran: " + "; ".join(f"{k} {v['runtime']} {v.get('precision')}"
                                                 for k, v in run["runtimes"].items()))
            print(f"  work done {b['gflop']:.0f} GFLOP: bound {b['gflop'] / gflops['bfloat16']:.1f} s at bf16 matmul speed, "
                  f"{b['gflop'] / gflops['float32']:.1f} s at fp32")
        by_run = {spec: [r["total_s"] for r in runs if r["run"] == spec] for spec in dict.fromkeys(args.order.split(","))}
        seeded = [spec for spec in by_run if spec.partition(":")[0] == "seeded"]
        for spec in (spec for spec in by_run if spec.partition(":")[0] == "every-slice"):
            for fast in seeded:
                print(f"\n{spec} / {fast}: {np.mean(by_run[spec]) / np.mean(by_run[fast]):.2f}x (means of "
                      f"{len(by_run[spec])} and {len(by_run[fast])} runs)")
        if args.json:
            Path(args.json).write_text(json.dumps({"settings": vars(args), "gflops": gflops, "unit_flops": unit,
                                                   "runs": runs}, indent=1, default=float))
            print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
