"""What a segmentation returns, zero-shot or from a trained run, and the device it runs on.

torch is imported only by `resolve_device`: a remote client (CLISCLib.remote) builds `SegmentResult` without it."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List

import numpy as np

from .errors import InputError


@dataclass
class SegmentResult:
    masks: List[np.ndarray]          # one (K, J, I) bool per prompt
    names: List[str]                 # the prompts
    saliency: List[np.ndarray]       # one (K, J, I) float32 in [0, 1] per prompt (0 where not computed)
    report: dict


def resolve_device(device: str):
    """The torch device for ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N`` (one GPU of several,
    as `clisc serve --devices` names them); InputError otherwise."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if device != "cpu" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA GPU is available to torch here; use --device cpu or auto")
    if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise InputError(f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s), numbered from 0")
    return torch.device(device)
