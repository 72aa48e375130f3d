"""Boolean activation columns packed 64 samples to a word, and counting their set bits.

A merge in boolean mode only needs, for the samples where both merged groups are active,
how many of them every other group covers. Packed columns make that an AND and a popcount
over the few words where the merged pair overlaps.
"""

from __future__ import annotations

import numpy as np
import torch

BITS_PER_WORD = 64

# Weight of bit i in a two's-complement int64 word: 2**i, with bit 63 worth -2**63.
_BIT_WEIGHTS = torch.tensor([1 << i for i in range(63)] + [-(1 << 63)], dtype=torch.int64)

_M1 = 0x5555555555555555
_M2 = 0x3333333333333333
_M4 = 0x0F0F0F0F0F0F0F0F
_H01 = 0x0101010101010101


def n_words(n_samples: int) -> int:
    return -(-n_samples // BITS_PER_WORD)


def pack_columns(mask: torch.Tensor) -> torch.Tensor:
    """`[m, c]` boolean (m a multiple of 64) -> `[c, m // 64]` int64 words, sample s at bit s % 64."""
    m, c = mask.shape
    if m % BITS_PER_WORD:
        raise ValueError(f"pack_columns: expected a multiple of {BITS_PER_WORD} rows, got {m}")
    if mask.device.type == "cpu":
        packed = np.packbits(mask.numpy(), axis=0, bitorder="little")  # [m // 8, c] uint8
        return torch.from_numpy(np.ascontiguousarray(packed.T).view(np.int64))
    return pack_columns_torch(mask)


def pack_columns_torch(mask: torch.Tensor) -> torch.Tensor:
    """`pack_columns` with torch ops only (any device)."""
    m, c = mask.shape
    weights = _BIT_WEIGHTS.to(mask.device)
    words = mask.T.reshape(c, m // BITS_PER_WORD, BITS_PER_WORD).to(torch.int64)
    return (words * weights).sum(dim=-1)


def popcount_rows(words: torch.Tensor) -> torch.Tensor:
    """Number of set bits in each row of a 2-D int64 tensor, as int64."""
    if words.device.type == "cpu":
        counts = np.bitwise_count(words.numpy().view(np.uint64)).sum(axis=1, dtype=np.int64)
        return torch.from_numpy(counts)
    return popcount_rows_torch(words)


def popcount_rows_torch(words: torch.Tensor) -> torch.Tensor:
    """`popcount_rows` with torch ops only (any device): the SWAR bit count."""
    x = words - ((words >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    return ((x * _H01) >> 56).sum(dim=1)
