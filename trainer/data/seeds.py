"""Deterministic seeds: every random choice of a job comes from a generator seeded with its own key
(seed, step, epoch, position...), never from a global stream, so a resumed run draws exactly what an
uninterrupted run would have drawn."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from (seed, step, ...): the same on every machine and Python run (unlike hash())."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts: int | str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derive_seed(*parts))
