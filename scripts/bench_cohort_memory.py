"""Peak memory and U-Net training speed of a cohort run's data path, held in memory against read lazily.

A synthetic cohort (CASES volumes of SHAPE voxels, a bright ellipsoid labelled foreground) goes through the two
ways a run can hold its cases, each in a fresh process:
- in memory: every case read and pre-processed up front, kept as the run kept it before the case store (image,
  body and uint8 slices per case), the U-Net trained on in-memory (image, label) pairs;
- lazy: every case pre-processed once into a run folder (`clisc.cohort.case_store`), the U-Net trained on
  `TrainingPairs` that map a case and its label (.npy) when a patch is cut from it, with 0 or N DataLoader
  workers.
Printed per mode and cohort size: peak RSS of the process (and of its largest worker), the U-Net's steps per
second over EPOCHS epochs (patch P³, batch 2, CPU), and the time to store/read the cases.

    python scripts/bench_cohort_memory.py --cases 10 40 --shape 96 160 160 --epochs 2 --patch 64
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_cohort(folder: Path, count: int, shape: tuple) -> None:
    from clisc.volume import Volume
    from clisc.writers import write_volume

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    k, j, i = np.ogrid[:shape[0], :shape[1], :shape[2]]
    for n in range(count):
        centre = rng.uniform(0.3, 0.7, 3) * shape
        label = ((k - centre[0]) / 12) ** 2 + ((j - centre[1]) / 20) ** 2 + ((i - centre[2]) / 20) ** 2 < 1
        image = rng.normal(100, 10, shape).astype(np.float32) + 80 * label
        image[:, :8] = 0  # background around the body, as in a scan
        grid = np.diag([1.0, 1.0, 1.0, 1.0])
        write_volume(folder / "images" / f"case{n:03d}.nii.gz", Volume(image, grid))
        write_volume(folder / "labels" / f"case{n:03d}.nii.gz", Volume(label.astype(np.uint8), grid))


def measure(mode: str, folder: Path, epochs: int, patch: int, workers: int) -> dict:
    import torch

    from clisc.cohort.case_store import TrainingPairs, store_case
    from clisc.cohort.cases import body_mask, list_cohort, preprocess, to_uint8_slices
    from clisc.cohort.run_folder import RunFolder
    from clisc.cohort.unet import train_unet
    from clisc.readers import read_volume

    torch.set_num_threads(2)
    cases = list_cohort(folder / "images")
    start = time.perf_counter()
    if mode == "memory":
        held, pairs = [], []
        for case in cases:
            volume = read_volume(case.path)
            image, crop = preprocess(volume)
            held.append((image, body_mask(volume.array)[crop], to_uint8_slices(image)))
            pairs.append((image, read_volume(folder / "labels" / f"{case.case_id}.nii.gz").array[crop] > 0))
    else:
        run = RunFolder(folder / f"run_{workers}")
        run.create()
        stored = [store_case(case, run.preprocessed(case.case_id)) for case in cases]
        for item in stored:
            label = read_volume(folder / "labels" / f"{item.case_id}.nii.gz").array[item.crop] > 0
            run.write_npy(run.unet_label(0, item.case_id), label)
        pairs = TrainingPairs(stored, [run.unet_label(0, item.case_id) for item in stored])
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    train_unet(pairs, epochs, patch_size=patch, batch_size=2, loader_workers=workers)
    seconds = time.perf_counter() - start
    steps = epochs * -(-len(cases) // 2)
    return {"mode": mode, "cases": len(cases), "workers": workers, "load_s": round(loaded, 1),
            "steps_per_s": round(steps / seconds, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_worker_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 160, 160])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--measure", nargs=3, metavar=("MODE", "FOLDER", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        mode, folder, workers = args.measure
        print(json.dumps(measure(mode, Path(folder), args.epochs, args.patch, int(workers))))
        return
    print(f"synthetic cohort of {args.shape} voxels per case; U-Net {args.epochs} epochs, patch {args.patch}³, "
          "batch 2, CPU")
    print(f"{'mode':8} {'cases':>5} {'workers':>7} {'load s':>7} {'steps/s':>8} {'peak RSS MB':>12} {'worker MB':>10}")
    for count in args.cases:
        with tempfile.TemporaryDirectory() as temporary:
            folder = Path(temporary)
            make_cohort(folder, count, tuple(args.shape))
            for mode, workers in (("memory", 0), ("lazy", 0), ("lazy", args.workers)):
                output = subprocess.run([sys.executable, __file__, "--measure", mode, str(folder), str(workers),
                                         "--epochs", str(args.epochs), "--patch", str(args.patch)],
                                        check=True, capture_output=True, text=True).stdout
                row = json.loads(output.strip().splitlines()[-1])
                print(f"{row['mode']:8} {row['cases']:>5} {row['workers']:>7} {row['load_s']:>7} "
                      f"{row['steps_per_s']:>8} {row['peak_rss_mb']:>12} {row['peak_worker_rss_mb']:>10}", flush=True)


if __name__ == "__main__":
    main()
