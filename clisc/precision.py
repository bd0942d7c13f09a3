"""Running models in lower precision (bf16/fp16 autocast) without its pitfalls.

Autocast keeps its low-precision copy of a weight only for leaf tensors that require grad; for a frozen
model, or under ``torch.inference_mode``, it re-casts every weight at every op, which measured 6-10x slower
on this project's CPUs in bfloat16 (a ViT-B/16 forward of 10 images: 0.54 s against 5.9 s, slower than
float32). So forward passes run under ``torch.no_grad`` with the parameters marked ``requires_grad`` for
the duration (`prepared`); no weight gradient is ever computed.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from .errors import InputError

DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}  # None: full precision


@contextlib.contextmanager
def prepared(model: nn.Module) -> Iterator[None]:
    """Eval mode and every parameter marked ``requires_grad`` for the duration; the previous state is restored.

    Gradients, where a caller takes them, are taken with respect to its own tensors (activations), never
    the weights; the marking is only for autocast's weight cache (see the module docstring).
    """
    was_training = model.training
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in requires_grad:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        model.train(was_training)


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` to ``dtype`` on the device's type, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def inference(model: nn.Module, device: torch.device, dtype: Optional[torch.dtype]) -> Iterator[None]:
    """Forward passes of ``model`` without gradients, under autocast to ``dtype`` (None: full precision)."""
    with torch.no_grad(), prepared(model), autocast(device, dtype):
        yield


def dtype_of(precision: str, what: str) -> Optional[torch.dtype]:
    """The autocast dtype of a precision name (`DTYPES`); InputError naming ``what`` for another name."""
    if precision not in DTYPES:
        raise InputError(f"{what} precision {precision!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[precision]
