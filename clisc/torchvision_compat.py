"""Import torchvision even where its compiled operators cannot load against the installed torch.

PyPI's torchvision wheels for Linux are CUDA builds. Beside a CPU build of torch their compiled library
(``_C.so``, or ``_C_stable.so`` from 0.29 on) fails to load, and ``import torchvision`` then raises
``RuntimeError: operator torchvision::nms does not exist``, because its fake-tensor registration of
``nms``/``qnms`` is not guarded. ``segment_anything``, ``open_clip`` and ``timm`` all import torchvision, so the
engine calls :func:`import_torchvision` before any of them.

The real import always runs first. Only when it has failed in exactly that way are the two missing operator
schemas defined (with a pure-torch ``nms``, the only compiled operator CLISC's dependencies use) and the import
retried, with one warning. Defining the schemas when the compiled library does load would make torchvision
register its own on top of them, which aborts the process (C++ terminate), so nothing is defined up front.
Other compiled operators (roi_align, deform_conv2d...) stay unavailable in the fallback, as before.
"""
from __future__ import annotations

import logging
import sys

import torch

from .errors import EnvironmentProblem

logger = logging.getLogger(__name__)

_NMS_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_MISSING_OPERATOR = "operator torchvision::nms does not exist"
_fallback_library = None  # keeps the torch.library.Library alive for the life of the process


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression, pure torch. boxes: (N, 4) x1y1x2y2; returns kept indices by score."""
    order = scores.argsort(descending=True)
    boxes = boxes[order].float()
    areas = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    top_left = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    iou = intersection / (areas[:, None] + areas[None, :] - intersection).clamp(min=1e-12)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(len(boxes)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def import_torchvision():
    """Import and return torchvision; install the pure-torch fallback only if the real import fails for want
    of its compiled operators.

    Raises:
        EnvironmentProblem: torchvision is not installed, or fails to import for another reason (the message
            names both versions and says what to install).
    """
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    try:
        import torchvision
    except ImportError as error:
        forget_partial_import()
        raise EnvironmentProblem(
            f"torchvision does not import ({error}). Install the torchvision release that matches torch "
            f"{torch.__version__} (in 3D Slicer: with the PyTorch extension's PyTorch Utils module)."
        ) from None
    except RuntimeError as error:
        forget_partial_import()
        if not is_missing_operator_error(error):
            raise EnvironmentProblem(
                f"torchvision fails to import beside torch {torch.__version__}: {str(error)[:300]}. Install the "
                "torchvision release built for this torch (same CUDA or CPU flavour)."
            ) from None
        define_fallback_operators()
        import torchvision

        after_fallback_import(torchvision)
    return torchvision


def is_missing_operator_error(error: BaseException) -> bool:
    """Whether ``error`` is the failure the fallback operators cure (and they are not defined yet)."""
    return _MISSING_OPERATOR in str(error) and _fallback_library is None


def forget_partial_import(keep_package: bool = False) -> None:
    """Drop the torchvision modules a failed import left in sys.modules, so that a retry runs them again
    (``keep_package``: all but ``torchvision`` itself, which an import hook runs again in place)."""
    for name in [name for name in sys.modules if name.startswith("torchvision.")
                 or (name == "torchvision" and not keep_package)]:
        del sys.modules[name]


def define_fallback_operators() -> None:
    """Define the ``torchvision::nms`` and ``qnms`` schemas, with the pure-torch `nms`, for an import to follow.
    Only after the real import has failed: see the module's docstring."""
    global _fallback_library
    _fallback_library = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        _fallback_library.define(name + _NMS_SCHEMA)
    _fallback_library.impl("nms", nms, "CompositeExplicitAutograd")


def after_fallback_import(torchvision) -> None:
    """Let ``torchvision.ops.nms`` run on the fallback operator (it refuses when the compiled library is missing),
    and say once what happened."""
    import torchvision.ops.boxes

    torchvision.ops.boxes._assert_has_ops = lambda: None
    logger.warning(
        "torchvision %s's compiled operators do not load against torch %s (mismatched builds, e.g. PyPI's CUDA "
        "torchvision beside a CPU torch); using a pure-torch nms. Install the torchvision build that matches "
        "torch to remove this warning.", torchvision.__version__, torch.__version__)
