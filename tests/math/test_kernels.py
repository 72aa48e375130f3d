"""Compiled kernels keep to the thread count torch's CPU operations are given (a worker's share of the cores)."""

from __future__ import annotations

import numpy as np
import torch

from spd_math._engine import kernels


def test_a_parallel_kernel_runs_on_torchs_threads_and_leaves_them_as_they_were():
    import numba

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        counts = np.random.default_rng(0).integers(0, 5, (64, 64)).astype(np.int32)
        kernels.pair_score_extremes(counts, np.ones(64), 1.0, 3.0)  # compiled with parallel=True
        assert torch.get_num_threads() == 1
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
