"""Which layer's LayerCAM finds the tumour: each candidate layer of each slice-classifier backbone, on BraTS.

For each backbone (EfficientNet-Lite0 from its ImageNet weights and from random weights, ResNet-50 from random
weights; no ImageNet ResNet-50 can be had here) the engine's own code trains the slice classifier
(`train_classifier`, the run's settings: Adam 1e-4, batch 8, StepLR) on the 4 BraTS FLAIR volumes' axial slices,
pre-processed as `clisc train` does (`cases.preprocess`, the classifier's truncated uint8 slices, resized to
--image-size), then computes LayerCAM (`layer_cam`) at every candidate layer on the slices that hold tumour.

Oracles: the slice labels (ground truth: 1 where the pre-processed slice holds tumour) stand in for CLIP's, and the
CAMs are scored on the ground-truth tumour slices (the classifier's own gate is left out, so that the layers are
compared on the same slices). No AMDA retraining. Scores per volume, against the tumour (label > 0) on the cropped
grid:
- "CAM Dice": Dice of the engine's label-free CAM mask (`postprocess_cams`: Otsu inside the body on those slices,
  3D opening, small components dropped), what prompts SAM in a run;
- "in tumour": the share of the CAM's mass (sum of its values inside the body) that lies inside the tumour;
  the tumour's share of the body on those slices is printed as the chance level.

    python scripts/bench_cam_layer.py [--epochs 2] [--image-size 128] [--backbones lite0-imagenet,lite0-random,...]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from clisc.cohort.cases import body_mask, preprocess, to_truncated_uint8_slices
from clisc.cohort.classifier import build_classifier, layer_cam, postprocess_cams, train_classifier
from clisc.cohort.classifier_data import resized
from clisc.metrics import dice
from clisc.models.loaders import resolve
from clisc.readers import read_volume

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats2015"
BACKBONES = {  # name: (architecture, weights: a catalogue name or None for random)
    "lite0-imagenet": ("efficientnet-lite0", "efficientnet_lite0"),
    "lite0-random": ("efficientnet-lite0", None),
    "resnet50-random": ("resnet50", None),
}
LAYERS = {"efficientnet-lite0": ("blocks.3", "blocks.4", "blocks.5", "blocks.6", "bn2"),
          "resnet50": ("layer2", "layer3", "layer4")}


def load_cases(every: int) -> list[dict]:
    """Each BraTS volume pre-processed as a run does, every ``every``-th axial slice: classifier slices (K, H, W)
    uint8, body, tumour, labels."""
    cases = []
    for folder in sorted(DATA.glob("pat*")):
        volume = read_volume(folder / "flair.nii.gz")
        image, crop = preprocess(volume)
        tumour = (read_volume(folder / "label.nii.gz").array > 0)[crop][::every]
        cases.append({"name": folder.name, "slices": to_truncated_uint8_slices(image)[::every],
                      "body": body_mask(volume.array)[crop][::every], "tumour": tumour,
                      "labels": tumour.any(axis=(1, 2)).astype(int)})
    return cases


def measure(backbone: str, cases: list[dict], args: argparse.Namespace) -> dict:
    architecture, weights = BACKBONES[backbone]
    model = build_classifier(resolve(weights, "classifier") if weights else None, seed=args.seed,
                             architecture=architecture)
    images = np.concatenate([resized(case["slices"], args.image_size).round().astype(np.uint8) for case in cases])
    labels = np.concatenate([case["labels"] for case in cases])
    started = time.perf_counter()
    losses = train_classifier(model, images, labels, args.epochs, seed=args.seed, image_size=args.image_size)
    print(f"{backbone}: trained {args.epochs} epoch(s) on {len(labels)} slices ({labels.sum()} with tumour) in "
          f"{time.perf_counter() - started:.0f} s; losses {', '.join(f'{loss:.3f}' for loss in losses)}", flush=True)
    scores = {}
    for layer in LAYERS[architecture]:
        model.cam_layer = layer
        per_case = []
        for case in cases:
            positive = case["labels"].astype(bool)
            cams = np.zeros(case["slices"].shape, np.float32)
            cams[positive] = layer_cam(model, case["slices"][positive], image_size=args.image_size)
            mask = postprocess_cams(cams, case["body"], positive)
            region = case["body"] & positive[:, None, None]
            mass = cams[region].sum()
            per_case.append((dice(mask, case["tumour"]),
                             cams[region & case["tumour"]].sum() / mass if mass > 0 else 0.0))
        scores[layer] = per_case
        print(f"  {layer:<9} CAM Dice {np.mean([s[0] for s in per_case]):.3f} "
              f"({', '.join(f'{s[0]:.2f}' for s in per_case)}), in tumour "
              f"{np.mean([s[1] for s in per_case]):.3f} ({', '.join(f'{s[1]:.2f}' for s in per_case)})", flush=True)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="classifier epochs (row d of bench_accuracy: 2)")
    parser.add_argument("--image-size", type=int, default=128, help="classifier input side (row d: 128)")
    parser.add_argument("--backbones", default=",".join(BACKBONES), help=f"comma-separated, of {','.join(BACKBONES)}")
    parser.add_argument("--every", type=int, default=1,
                        help="every N-th axial slice only (quicker; the CAM mask's 3D opening then spans N slices)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cases = load_cases(args.every)
    chance = [(case["tumour"] & case["body"]).sum() / (case["body"] & case["labels"].astype(bool)[:, None, None]).sum()
              for case in cases]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; every {args.every} slice(s); "
          f"{args.epochs} epoch(s) at {args.image_size} px; cases "
          f"{', '.join(case['name'] for case in cases)}; chance level of 'in tumour' (tumour share of the body on "
          f"tumour slices): {np.mean(chance):.3f} ({', '.join(f'{c:.2f}' for c in chance)})", flush=True)
    for backbone in args.backbones.split(","):
        measure(backbone, cases, args)


if __name__ == "__main__":
    main()
