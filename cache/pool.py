"""The pool that hands out and reclaims every piece of per-session device state.

A lease holds one session's dual KV cache, its streaming-decoder state and its frame store
(decoded frames kept for context selection). Releasing a lease drops the decoder and frame
tensors and returns the KV buffers to a small free list, so the next session reuses them
without a fresh multi-GB allocation. `bytes_in_use` is what admission and metrics read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cache.decoder import DecoderState
from cache.kv import KVCache, KVLayout


class FrameStore:
    """Tensors a session keeps between chunks (decoded frames of the current shot, context
    candidates and their latents), by key, with their byte count."""

    def __init__(self) -> None:
        self._items: dict[object, torch.Tensor] = {}

    def put(self, key: object, value: torch.Tensor) -> None:
        self._items[key] = value

    def get(self, key: object) -> torch.Tensor | None:
        return self._items.get(key)

    def pop(self, key: object) -> torch.Tensor | None:
        return self._items.pop(key, None)

    def names(self) -> list[object]:
        return list(self._items)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._items.values())


@dataclass
class Lease:
    """One session's device state, owned by the pool until released."""

    owner: str
    kv: KVCache
    decoder: DecoderState
    frames: FrameStore = field(default_factory=FrameStore)
    released: bool = False

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + self.decoder.nbytes + self.frames.nbytes


class PoolExhausted(RuntimeError):
    """No room for another session's state."""


class StatePool:
    """Leases per-session state for one model; thread-safe (engine thread and event loop)."""

    def __init__(
        self,
        layout: KVLayout,
        new_decoder: Callable[[], DecoderState],
        dtype: torch.dtype,
        device: torch.device | str,
        max_leases: int = 0,
        keep_free: int = 2,
    ) -> None:
        self.layout = layout
        self._new_decoder = new_decoder
        self.dtype, self.device = dtype, torch.device(device)
        self.max_leases = max_leases  # 0 = no cap here (admission decides)
        self.keep_free = keep_free
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._free: list[KVCache] = []

    def acquire(self, owner: str) -> Lease:
        """A fresh lease for `owner`; raises PoolExhausted past the cap, or on device OOM."""
        with self._lock:
            if owner in self._leases:
                raise ValueError(f"{owner} already holds a lease")
            if self.max_leases and len(self._leases) >= self.max_leases:
                raise PoolExhausted(f"all {self.max_leases} session slots in use")
            kv = self._free.pop() if self._free else None
        if kv is None:
            try:
                kv = KVCache(self.layout, 1, self.dtype, self.device)
            except torch.OutOfMemoryError as exc:
                raise PoolExhausted(f"no device memory for another session's cache: {exc}") from exc
        lease = Lease(owner, kv, self._new_decoder())
        with self._lock:
            self._leases[owner] = lease
        return lease

    def release(self, lease: Lease) -> None:
        """Return a lease's state; idempotent, so every exit path may call it."""
        with self._lock:
            if lease.released or self._leases.get(lease.owner) is not lease:
                return
            lease.released = True
            del self._leases[lease.owner]
            lease.decoder.reset()
            lease.frames.clear()
            if len(self._free) < self.keep_free:
                self._free.append(lease.kv)
            lease.kv = None  # type: ignore[assignment]  # the buffers belong to the pool again

    @property
    def leases(self) -> int:
        with self._lock:
            return len(self._leases)

    @property
    def bytes_in_use(self) -> int:
        """Bytes held by live leases: KV caches, decoder states and frame stores."""
        with self._lock:
            return sum(lease.nbytes for lease in self._leases.values())

    def breakdown(self) -> dict[str, int]:
        """Bytes in use by kind (for metrics)."""
        with self._lock:
            leases = list(self._leases.values())
        return {
            "kv": sum(x.kv.nbytes for x in leases),
            "decoder": sum(x.decoder.nbytes for x in leases),
            "frames": sum(x.frames.nbytes for x in leases),
        }

    @property
    def bytes_reserved(self) -> int:
        """Bytes of KV buffers kept on the free list for reuse."""
        with self._lock:
            return sum(kv.nbytes for kv in self._free)

    def trim(self) -> None:
        """Drop the free list (e.g. after an OOM, before emptying the allocator cache)."""
        with self._lock:
            self._free.clear()
