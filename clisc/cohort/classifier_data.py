"""The slice classifier's training set (METHOD.md §B steps 3-4), written to a scratch file case by case, so that
a cohort's slices never have to fit in memory."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .case_store import SliceFile, StoredCase
from .run_folder import RunFolder

logger = logging.getLogger("clisc")


def classifier_training_set(folder: RunFolder, items: list[StoredCase], amda: bool, scratch: Path, size: int,
                            seed: int) -> tuple[SliceFile, np.ndarray]:
    """The slice classifier's training set, written case by case to the file ``scratch``, so that the cohort's
    slices never have to fit in memory: every slice CLIP labelled (``folder.slice_labels``), resized to
    ``size`` × ``size`` (`resized`), and with ``amda`` their AMDA copies after them: exactly
    `amda.amda_masked_copies` of all the slices (from the first classifier's CAMs, ``folder.cams``) with a
    generator seeded by ``seed``, computed one case at a time.

    Returns:
        The (N, size, size) uint8 slices (2N with ``amda``) and their (N,) int labels.
    """
    from .amda import hide_discriminative, hide_rectangle, is_adaptive, mean_area

    all_labels = [np.array(json.loads(folder.slice_labels(item.case_id).read_text())) for item in items]
    kept = [labels >= 0 for labels in all_labels]
    labels = np.concatenate([case_labels[keep] for case_labels, keep in zip(all_labels, kept)])
    count = len(labels)
    if len(set(labels.tolist())) < 2:
        logger.warning("CLIP gave every confident slice the label %d: the classifier sees one class", labels[0])
    hidden, random_rows, row = [], [], 0
    copies_file = scratch.with_name(scratch.name + ".copies")
    with open(scratch, "wb") as originals, open(copies_file, "wb") as copies:
        for item, case_labels, keep in zip(items, all_labels, kept):
            images = resized(item.classifier_slices()[keep], size).round().astype(np.uint8)
            originals.write(images.tobytes())
            if amda:
                saved = np.load(folder.cams(item.case_id, amda=False))
                cams = resized(saved["cam"][keep], size)
                masks = resized(saved["mask"][keep], size, "nearest") > 0.5
                for n, label in enumerate(case_labels[keep]):
                    if is_adaptive(label, masks[n]):
                        hidden.append(hide_discriminative(images[n], cams[n], masks[n]))
                    else:
                        random_rows.append(count + row + n)
                copies.write(images.tobytes())
            row += len(images)
    with open(scratch, "ab") as originals, open(copies_file, "rb") as copies:
        shutil.copyfileobj(copies, originals)  # the copies after every original, in the same order
    copies_file.unlink()
    if not amda:
        return SliceFile(scratch, count, size), labels
    area, rng, pixels = mean_area(hidden), np.random.default_rng(seed), size * size
    with open(scratch, "r+b") as file:
        for row in random_rows:
            file.seek(row * pixels)
            image = np.frombuffer(file.read(pixels), np.uint8).reshape(size, size).copy()
            hide_rectangle(image, area, rng)
            file.seek(row * pixels)
            file.write(image.tobytes())
    return SliceFile(scratch, 2 * count, size), np.concatenate([labels, labels])


def resized(slices: np.ndarray, size: int, mode: str = "bilinear") -> np.ndarray:
    """(N, size, size) float32 of slices (N, H, W), resized as the classifier resizes its input (whole slice,
    no crop), so that slices of volumes of different sizes train together."""
    tensor = torch.as_tensor(np.ascontiguousarray(slices)).float()[:, None]
    if mode == "nearest":
        return F.interpolate(tensor, size=(size, size), mode="nearest")[:, 0].numpy()
    return F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[:, 0].numpy()
