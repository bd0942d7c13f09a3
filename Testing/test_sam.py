"""`SliceSegmenter` against segment_anything's own `SamPredictor`, and its out-of-memory fallback.

A tiny SAM of the real classes with random weights: this shows our batched pre-processing, fused encoder
and prompt handling give the stock predictor's masks; it cannot show mask quality.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clisc.models.random_weights import tiny_sam
from clisc.prompts import SamPrompt
from clisc.sam import SliceSegmenter
from clisc.torchvision_compat import import_torchvision

ALL_BLOBS = 10**6  # keep every blob of the (noisy, random-weight) masks


@pytest.fixture(scope="module")
def slices():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 60, size=(2, 90, 120), dtype=np.uint8)
    images[:, 30:60, 40:80] += 150
    return np.repeat(images[..., None], 3, axis=-1)


@pytest.mark.parametrize("prompt", [
    SamPrompt(np.array([[40.0, 30, 79, 59]]), None, None, 1),
    SamPrompt(None, np.array([[50.0, 40], [70, 50], [5, 5]]), np.array([1, 1, 0]), 1),
    SamPrompt(np.array([[40.0, 30, 79, 59]]), np.array([[50.0, 40]]), np.array([1]), 1),
])
def test_masks_equal_the_stock_predictor(slices, prompt):
    import_torchvision()
    from segment_anything import SamPredictor

    sam = tiny_sam()
    predictor = SamPredictor(tiny_sam())
    segmenter = SliceSegmenter(sam, batch_size=2)
    embeddings = segmenter.embed(slices)
    for image, embedding in zip(slices, embeddings):
        predictor.set_image(image)
        torch.testing.assert_close(embedding, predictor.features[0], atol=1e-4, rtol=1e-4)
        expected, _, _ = predictor.predict(point_coords=prompt.points, point_labels=prompt.labels,
                                           box=None if prompt.boxes is None else prompt.boxes[0],
                                           multimask_output=False)
        ours = segmenter.predict(embedding, image.shape[:2], SamPrompt(prompt.boxes, prompt.points, prompt.labels, ALL_BLOBS))
        # Random weights put many logits near the 0 threshold, where float rounding (fused vs stock
        # attention) could flip a pixel; a wrong transform or prompt would change much of the mask.
        assert (ours != expected[0]).mean() < 0.001


def test_several_boxes_give_the_union_of_their_masks(slices):
    segmenter = SliceSegmenter(tiny_sam())
    embedding = segmenter.embed(slices[:1])[0]
    boxes = np.array([[10.0, 10, 40, 40], [70, 50, 110, 80]])
    union = segmenter.predict(embedding, (90, 120), SamPrompt(boxes, None, None, ALL_BLOBS))
    first = segmenter.predict(embedding, (90, 120), SamPrompt(boxes[:1], None, None, ALL_BLOBS))
    second = segmenter.predict(embedding, (90, 120), SamPrompt(boxes[1:], None, None, ALL_BLOBS))
    assert np.array_equal(union, first | second)


def test_gpu_out_of_memory_halves_the_batch_then_falls_back_to_the_cpu(caplog):
    segmenter = SliceSegmenter(tiny_sam(), batch_size=4)
    segmenter.device = torch.device("cuda")  # pretend; the encoder below raises as CUDA would
    calls = []

    def encode(batch):
        calls.append((segmenter.device.type, segmenter.batch_size))
        if segmenter.device.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return torch.zeros(len(batch), 256, 64, 64)

    segmenter._encode = encode
    segmenter._preprocess = lambda image: torch.zeros(3, 1024, 1024)
    embeddings = segmenter.embed(np.zeros((3, 32, 32, 3), np.uint8))
    assert embeddings.shape == (3, 256, 64, 64)
    assert calls == [("cuda", 4), ("cuda", 2), ("cuda", 1), ("cpu", 1)]
    assert "continues on the CPU" in caplog.text
