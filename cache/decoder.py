"""Per-session state of the streaming VAE decoder (docs/design/vae-and-text.md §5).

The Wan VAE decoder is causal in time: every causal conv keeps the last two time steps
of its input from earlier calls. That history lives here, one slot per causal conv of
the decoder, so the decoder module itself can be shared by every session.

The slots are opaque to this module: the decoder rebinds them (it never writes into a
slot tensor), and it may store a marker instead of a tensor in a slot that is still on
its first-frame path. Because slots are rebound, a chunk is decoded on a shallow copy of
the list and committed only when the whole chunk succeeded (`commit`).
"""

from __future__ import annotations

import torch

Slot = torch.Tensor | str | None  # a str is the decoder's own "first frame" marker


class DecoderState:
    """Causal-conv history of one session's decoder, reset at the start of every shot."""

    def __init__(self, num_slots: int, batch: int = 1) -> None:
        if num_slots <= 0 or batch <= 0:
            raise ValueError(f"num_slots and batch must be positive, got {num_slots}, {batch}")
        self.num_slots = num_slots
        self.batch = batch
        self.slots: list[Slot] = [None] * num_slots
        self.first = True  # the next latent frame is the first of a shot
        self.latent_frames = 0  # latent frames decoded since the last reset

    def reset(self) -> None:
        """Forget the history: the next latent starts a new shot (its first chunk gives 1+4+4 frames)."""
        self.slots = [None] * self.num_slots
        self.first = True
        self.latent_frames = 0

    def working_copy(self) -> list[Slot]:
        """A shallow copy for one chunk; the decoder rebinds its entries, never mutates them."""
        return list(self.slots)

    def commit(self, slots: list[Slot], latent_frames: int) -> None:
        """Adopt the slots of a fully decoded chunk of `latent_frames` latents."""
        if len(slots) != self.num_slots:
            raise ValueError(f"expected {self.num_slots} slots, got {len(slots)}")
        self.slots = slots
        self.latent_frames += latent_frames
        if latent_frames:
            self.first = False

    @property
    def nbytes(self) -> int:
        """Bytes held by the slot tensors, each storage counted once."""
        seen: dict[int, int] = {}
        for s in self.slots:
            if isinstance(s, torch.Tensor):
                st = s.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
        return sum(seen.values())

    @property
    def live_slots(self) -> int:
        """Slots that hold a tensor (the rest are empty or first-frame markers)."""
        return sum(isinstance(s, torch.Tensor) for s in self.slots)
