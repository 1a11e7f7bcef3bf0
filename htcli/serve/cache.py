"""Predicted maps, cached by concept and encoder in a bounded LRU, behind the `Predictor` interface.

A server sees the same concepts again and again; the hypernetwork pass is cheap, the concept
encoder (CLIP's text tower on a real model) less so. `CachedPredictor` is a `Predictor` whose
`predict` answers known concept phrases from a `MapCache` and predicts the others, so `steer()`
uses it unchanged. Each phrase is predicted alone, so a concept's cached maps never depend on
which other concepts happened to arrive with it. Reference images are never cached.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from htcli.core.transport import Maps
from htcli.data.concepts import Concept
from htcli.methods.predict import Prediction, Predictor


def _nbytes(value: Any) -> int:
    """Bytes of the tensors (or arrays) in a nested entry: what a cached entry holds, bar small change."""
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    return sum(_nbytes(item) for item in items)


class MapCache:
    """A thread-safe LRU of at most `capacity` entries and `max_bytes` bytes of tensors (0: keep
    nothing), counting hits and misses. An entry larger than `max_bytes` alone is not kept."""

    def __init__(self, capacity: int, max_bytes: int = 2**62) -> None:
        if capacity < 0 or max_bytes < 0:
            raise ValueError(f"cache capacity and max_bytes must be >= 0, got {capacity} and {max_bytes}")
        self.capacity, self.max_bytes = capacity, max_bytes
        self.hits = self.misses = 0
        self.bytes = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()  # key -> (value, its bytes)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            if key not in self._items:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key][0]

    def put(self, key: Hashable, value: Any) -> None:
        size = _nbytes(value)
        with self._lock:
            if not self.capacity or size > self.max_bytes:
                return
            if key in self._items:
                self.bytes -= self._items.pop(key)[1]
            self._items[key] = (value, size)
            self.bytes += size
            while len(self._items) > self.capacity or self.bytes > self.max_bytes:
                self.bytes -= self._items.popitem(last=False)[1][1]  # the least recently used

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._items), "capacity": self.capacity, "bytes": self.bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses}


@dataclass
class CachedPredictor(Predictor):
    """A `Predictor` sharing another's checkpoint and encoder, with concept maps from `cache`. Not
    thread-safe by itself: the encoder's tokenizer must not run in two threads at once."""

    cache: MapCache = field(default_factory=lambda: MapCache(0))

    @classmethod
    def wrap(cls, predictor: Predictor, cache: MapCache) -> CachedPredictor:
        return cls(**{f.name: getattr(predictor, f.name) for f in fields(Predictor)}, cache=cache)

    def key(self, concept: str | Concept) -> tuple:
        """(encoder, checkpoint digest, concept): the maps of a concept (its name and phrase, which
        decide what the hypernetwork reads of it) or of a phrase, under one encoder and hypernetwork."""
        what = concept if isinstance(concept, str) else (concept.name, concept.phrase)
        return self.checkpoint.encoder, self.digest, what

    def predict(self, phrases: Sequence[str | Concept] = (), images: Sequence[Any] = (),
                gap_correction: bool = True) -> Prediction:
        """`Predictor.predict`, with concept phrases from the cache when it has them."""
        start = time.perf_counter()
        found: list[tuple[Maps, dict]] = []  # (maps, neighbour record) per phrase
        for phrase in phrases:
            entry = self.cache.get(self.key(phrase))
            if entry is None:
                predicted = super().predict([phrase])
                entry = (predicted.maps[0], predicted.neighbours[0])
                self.cache.put(self.key(phrase), entry)
            found.append(entry)
        if images:
            predicted = super().predict((), images, gap_correction)
            found.append((predicted.maps[0], predicted.neighbours[0]))
        if not found:
            return super().predict()  # raises: nothing to predict
        # copies: a caller that edits its dicts leaves the cache alone
        return Prediction([dict(maps) for maps, _ in found], [dict(record) for _, record in found],
                          (time.perf_counter() - start) * 1e3)
