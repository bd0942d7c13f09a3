"""Segment a new volume with a finished cohort run's U-Net (`clisc apply`, CLISCTrain's Apply)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from ..progress import CancelToken, ProgressCallback, no_progress
from ..result import SegmentResult, resolve_device
from ..volume import Volume
from .cases import preprocess, uncrop
from .run_folder import RunFolder


def apply_run(run_dir: str | Path, volume: Volume, device: str = "auto", progress: ProgressCallback = no_progress,
              cancel: Optional[CancelToken] = None) -> SegmentResult:
    """Segment ``volume`` with a run's final U-Net: pre-processed as in training, sliding-window inference,
    the result put back on the volume's grid. Returns one (K, J, I) bool mask named after the run's prompt."""
    from .unet import load_unet, predict

    folder = RunFolder(run_dir)
    config = folder.require_finished()
    device = resolve_device(device)
    start = time.perf_counter()
    image, crop = preprocess(volume)
    mask = predict(load_unet(folder.final_model, device), image, config["options"]["patch_size"], device,
                   progress=progress, cancel=cancel)
    report = {"trained_run": str(folder.path), "device": str(device), "seconds": {"apply": time.perf_counter() - start}}
    return SegmentResult([uncrop(mask, crop, volume.array.shape)], [config["prompt"]], [], report)
