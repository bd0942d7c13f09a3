"""Import torchvision even where its compiled operators cannot load against the installed torch.

PyPI's torchvision wheels are built against CUDA torch. Beside a CPU build of torch their ``_C`` library
fails to load and ``import torchvision`` then raises ``RuntimeError: operator torchvision::nms does not
exist``, because its fake-tensor registration of ``nms``/``qnms`` is not guarded. ``segment_anything`` and
``open_clip`` both import torchvision, so the engine calls :func:`import_torchvision` before either.

When the compiled operators do not load, this defines the two operator schemas torchvision needs at import
time, gives ``nms`` a pure-torch implementation (the only compiled operator CLISC's dependencies use), and
logs one warning. Other compiled operators (roi_align, deform_conv2d...) stay unavailable, as before.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_NMS_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
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


def _compiled_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.submodule_search_locations is None:
        return True  # not installed: let the real import report it
    for folder in spec.submodule_search_locations:
        for library in Path(folder).glob("_C.*"):
            try:
                torch.ops.load_library(str(library))
                return True
            except (OSError, ImportError, RuntimeError) as error:
                logger.debug("torchvision compiled operators do not load: %s", error)
                return False
    return False


def _define_fallback_operators() -> None:
    global _fallback_library
    _fallback_library = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        _fallback_library.define(name + _NMS_SCHEMA)
    _fallback_library.impl("nms", nms, "CompositeExplicitAutograd")


def import_torchvision():
    """Import and return torchvision, installing the pure-torch fallback first when it is needed."""
    import sys

    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    if not _compiled_ops_load():
        _define_fallback_operators()
        import torchvision.ops.boxes

        # torchvision.ops.nms refuses to run when the compiled library is missing; ours is registered.
        torchvision.ops.boxes._assert_has_ops = lambda: None
        logger.warning(
            "torchvision's compiled operators do not load against torch %s (mismatched builds); "
            "using a pure-torch nms. Install the torchvision build that matches torch to remove this warning.",
            torch.__version__,
        )
    import torchvision

    return torchvision
