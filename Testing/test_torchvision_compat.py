"""The engine imports segment_anything and open_clip even where torchvision's compiled ops do not load."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from clisc.torchvision_compat import nms

SCRIPT = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import clisc
    from clisc.models import loaders
    from clisc.torchvision_compat import _compiled_ops_load, import_torchvision
    compiled = _compiled_ops_load()
    torchvision = import_torchvision()
    import_torchvision()
    import open_clip, segment_anything, torch
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 9, 10.]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    print("compiled" if compiled else "fallback", torchvision.ops.nms(boxes, scores, 0.5).tolist())
""")


def test_import_in_a_fresh_process_warns_once_and_nms_works():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    mode, kept = run.stdout.split(maxsplit=1)
    assert kept.strip() == "[3, 2]"
    warnings = run.stderr.count("torchvision's compiled operators do not load")
    assert warnings == (1 if mode == "fallback" else 0), run.stderr


def test_pure_torch_nms_matches_a_brute_force_reference():
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(200, 2, generator=generator) * 100
    boxes = torch.cat([corners, corners + torch.rand(200, 2, generator=generator) * 30 + 1], dim=1)
    scores = torch.rand(200, generator=generator)
    kept = nms(boxes, scores, 0.4).tolist()

    def iou(a, b):
        width = (min(a[2], b[2]) - max(a[0], b[0])).clamp(min=0)
        height = (min(a[3], b[3]) - max(a[1], b[1])).clamp(min=0)
        inter = width * height
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    expected = []
    for i in scores.argsort(descending=True).tolist():
        if all(iou(boxes[i], boxes[j]) <= 0.4 for j in expected):
            expected.append(i)
    assert kept == expected
