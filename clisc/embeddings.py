"""SAM image embeddings of a volume's slices, each computed once: `EmbeddingCache` keeps them (least recently used
dropped first) and `SliceEmbeddings` computes the missing ones of one image, in batches.

Refinement (`clisc.refine`) and the zero-shot pipeline (`clisc.zeroshot`) both reach SAM's embeddings through a
`SliceEmbeddings`; given one cache, they share what either computed of the same image (same SAM, axis and view).
"""
from __future__ import annotations

import zlib
from collections import OrderedDict
from typing import Iterable, List, Optional

import numpy as np
import torch

from .errors import InputError

# 64 slices: 64 × 4 MiB = 256 MiB for SAM, MedSAM and LiteMedSAM alike (every embedding is 256 × 64 × 64 float32).
DEFAULT_CACHE_SLICES = 64


class EmbeddingCache:
    """SAM image embeddings (256, 64, 64) float32, kept on the CPU, least recently used dropped first.

    Args:
        max_slices: how many embeddings are kept: ``max_slices`` × 4 MiB (1 MiB = 2**20 bytes) at most.
    """

    EMBEDDING_MIB = 256 * 64 * 64 * 4 / 2 ** 20  # 4.0

    def __init__(self, max_slices: int = DEFAULT_CACHE_SLICES) -> None:
        if max_slices < 1:
            raise InputError(f"the embedding cache must hold at least one slice (got {max_slices})")
        self.max_slices = max_slices
        self._items: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self.hits = self.misses = 0

    @property
    def max_mib(self) -> float:
        return self.max_slices * self.EMBEDDING_MIB

    @property
    def mib(self) -> float:
        return sum(t.numel() * t.element_size() for t in self._items.values()) / 2 ** 20

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: tuple) -> bool:
        return key in self._items

    def get(self, key: tuple) -> Optional[torch.Tensor]:
        embedding = self._items.get(key)
        if embedding is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return embedding

    def put(self, key: tuple, embedding: torch.Tensor) -> None:
        self._items[key] = embedding.detach().to("cpu", torch.float32)
        self._items.move_to_end(key)
        while len(self._items) > self.max_slices:
            self._items.popitem(last=False)


class SliceEmbeddings:
    """The SAM embeddings of the slices of one image along one axis: from the cache, else computed (then cached).

    Args:
        segmenter: the SAM (`clisc.sam.SliceSegmenter` or one like it); its ``embed`` and ``batch_size`` (1 when it
            has none) are used.
        view: (K, J, I) uint8, the image SAM sees, on the volume's grid.
        axis: the slice axis (0 = k, 1 = j, 2 = i).
        cache: where embeddings are kept; one cache may serve several images and SAMs.

    Embeddings are keyed by the SAM and what it sees (axis, shape and a checksum of the view), so users of one
    image share a cache safely. The key holds the segmenter itself: a cache entry keeps it alive, so its identity
    is never reused for another model. ``computed`` counts the encoder passes made through this object.
    """

    def __init__(self, segmenter, view: np.ndarray, axis: int, cache: EmbeddingCache) -> None:
        self.segmenter = segmenter
        self.cache = cache
        self.slices = np.moveaxis(view, axis, 0)  # (N, rows, columns) uint8
        self.key = (segmenter, axis, view.shape, zlib.crc32(np.ascontiguousarray(view)))
        self.computed = 0

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Slice ``index``'s embedding (256, 64, 64): from the cache, or one encoder pass (then cached)."""
        embedding = self.cache.get(self.key + (int(index),))
        return self._embed([int(index)])[0] if embedding is None else embedding

    def compute(self, indices: Iterable[int]) -> None:
        """Embed those of ``indices`` that are not cached, ``segmenter.batch_size`` slices per encoder call."""
        missing = list(dict.fromkeys(int(i) for i in indices if self.key + (int(i),) not in self.cache))
        step = max(1, int(getattr(self.segmenter, "batch_size", 1)))
        for start in range(0, len(missing), step):
            self._embed(missing[start:start + step])

    def _embed(self, batch: List[int]) -> List[torch.Tensor]:
        embeddings = self.segmenter.embed(np.repeat(self.slices[batch][..., None], 3, axis=-1))
        embeddings = [embedding.detach().to("cpu", torch.float32) for embedding in embeddings]
        for index, embedding in zip(batch, embeddings):
            self.cache.put(self.key + (index,), embedding)
        self.computed += len(batch)
        return embeddings
