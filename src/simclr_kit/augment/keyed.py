"""Counter-based randomness: uniform floats keyed by (seed, epoch, sample index, view, slot).

A pure function of the key in int64 tensor ops on the indices' device (no generator state), so a
sample's draws do not depend on the batch size, the order within the batch, the device or the
number of processes. Each augmentation op reads its own columns (slots) of the draws; see
``op.slot_layout``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64 increment: odd, 2^64 / golden ratio
_SLOT_STEP = 0xD1B54A32D192ED03
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64 finaliser constants


def _signed(value: int) -> int:
    return (value & _M64) - (1 << 64) if value & (1 << 63) else value & _M64


def _mix_int(value: int) -> int:
    """splitmix64 finaliser on a Python int: the host-side (seed, epoch, view) part of the key."""
    value = ((value ^ (value >> 30)) * _MIX1) & _M64
    value = ((value ^ (value >> 27)) * _MIX2) & _M64
    return value ^ (value >> 31)


def _srl(x: Tensor, shift: int) -> Tensor:
    # torch's >> on int64 is arithmetic; the mixer needs a logical shift to stay a bijection.
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def _mix(x: Tensor) -> Tensor:
    """splitmix64 finaliser on an int64 tensor; the multiplications wrap modulo 2^64."""
    x = (x ^ _srl(x, 30)) * _signed(_MIX1)
    x = (x ^ _srl(x, 27)) * _signed(_MIX2)
    return x ^ _srl(x, 31)


def keyed_uniforms(indices: Tensor, seed: int, epoch: int, views: Sequence[int],
                   slots: int) -> Tensor:
    """Uniform floats in [0, 1) keyed by (seed, epoch, index, view, slot).

    ``indices (N,)`` -> ``(len(views) * N, slots)``, the rows of each view in turn. A pure function
    of the key (no generator state), so every batching and device gives the same numbers.
    """
    seed_key = _mix_int((seed * _GOLDEN + 1) & _M64)
    epoch_key = _mix_int((seed_key + (epoch + 1) * _GOLDEN) & _M64)
    ids = indices.to(torch.int64) * _signed(_GOLDEN)
    states = [ids + _signed(_mix_int((epoch_key + (v + 1) * _GOLDEN) & _M64)) for v in views]
    state = _mix(torch.cat(states) if len(states) > 1 else states[0])
    slot = torch.arange(1, slots + 1, device=indices.device, dtype=torch.int64)
    bits = _mix(state[:, None] + slot * _signed(_SLOT_STEP))
    # The top 24 bits convert to float32 exactly: identical floats on every device.
    return _srl(bits, 40).to(torch.float32) * 2.0**-24
