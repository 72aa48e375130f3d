"""Boolean activation masks packed 64 samples to a word, and counting their overlaps.

A merge in boolean mode needs, for the samples where both merged groups are active, how
many of them every other group covers. Masks are stored word-major (`[words, groups]`)
so that the words where the merged pair overlaps are whole rows to gather; counting is
an AND and a popcount. On the CPU the work goes through NumPy (hardware popcount, fast
strided access; see `backend`); elsewhere through torch (SWAR popcount).
"""

from __future__ import annotations

import numpy as np
import torch

from spd_math._engine import backend
from spd_math.errors import MergeError

BITS_PER_WORD = 64

# Weight of bit i in a two's-complement int64 word: 2**i, with bit 63 worth -2**63.
_BIT_WEIGHTS = torch.tensor([1 << i for i in range(63)] + [-(1 << 63)], dtype=torch.int64)

_M1 = 0x5555555555555555
_M2 = 0x3333333333333333
_M4 = 0x0F0F0F0F0F0F0F0F
_H01 = 0x0101010101010101


def n_words(n_samples: int) -> int:
    return -(-n_samples // BITS_PER_WORD)


def pack_words(mask: torch.Tensor) -> torch.Tensor:
    """`[m, c]` boolean (m a multiple of 64) -> `[m // 64, c]` int64; sample s is bit s % 64 of word s // 64."""
    m, c = mask.shape
    if m % BITS_PER_WORD:
        raise MergeError(f"pack_words: expected a multiple of {BITS_PER_WORD} rows, got {m}")
    if not backend.numpy_fast_path(mask):
        return pack_words_torch(mask)
    packed = np.packbits(mask.numpy(), axis=0, bitorder="little")  # [m // 8, c]: 8 samples a byte
    words = packed.reshape(m // BITS_PER_WORD, 8, c).transpose(0, 2, 1)  # 8 bytes of a word together
    return torch.from_numpy(np.ascontiguousarray(words).view(np.int64).reshape(m // BITS_PER_WORD, c))


def pack_words_torch(mask: torch.Tensor) -> torch.Tensor:
    """`pack_words` with torch ops only (any device)."""
    m, c = mask.shape
    bits = mask.reshape(m // BITS_PER_WORD, BITS_PER_WORD, c).to(torch.int64)
    return (bits * _BIT_WEIGHTS.to(mask.device)[:, None]).sum(dim=1)


def overlap_counts(masks: torch.Tensor, selector: torch.Tensor) -> torch.Tensor:
    """For every column g of `masks` (`[words, groups]`), the number of bits set in both g and `selector`."""
    words = torch.nonzero(selector).squeeze(1)
    if not backend.numpy_fast_path(masks):
        return overlap_counts_torch(masks, selector, words)
    rows = masks.numpy()[words.numpy()]
    rows &= selector.numpy()[words.numpy()][:, None]
    counts = np.bitwise_count(rows.view(np.uint64)).sum(axis=0, dtype=np.int64)
    return torch.from_numpy(counts)


def overlap_counts_torch(masks: torch.Tensor, selector: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """`overlap_counts` with torch ops only (any device): the SWAR bit count."""
    x = masks.index_select(0, words) & selector.index_select(0, words)[:, None]
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    return ((x * _H01) >> 56).sum(dim=0)
