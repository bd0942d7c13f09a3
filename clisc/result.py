"""What a segmentation returns, zero-shot or from a trained run, and the device it runs on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
import torch

from .errors import InputError


@dataclass
class SegmentResult:
    masks: List[np.ndarray]          # one (K, J, I) bool per prompt
    names: List[str]                 # the prompts
    saliency: List[np.ndarray]       # one (K, J, I) float32 in [0, 1] per prompt (0 where not computed)
    report: dict


def resolve_device(device: str) -> torch.device:
    """The torch device for ``auto`` (CUDA when available), ``cpu`` or ``cuda``; InputError otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is available to torch here; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)
