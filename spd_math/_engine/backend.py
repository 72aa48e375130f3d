"""Which implementation a hot-loop primitive takes for a tensor.

CPU tensors share memory with NumPy, whose popcount, strided access and index search are
much faster than torch's CPU kernels for the small per-merge operations; other devices use
torch. Both paths compute the same exact integers; tests run the torch path on the CPU by
patching `numpy_fast_path`.
"""

from __future__ import annotations

import torch


def numpy_fast_path(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu"
