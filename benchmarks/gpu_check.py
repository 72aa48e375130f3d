"""On a machine with CUDA: the merge on the GPU and on the CPU, same input and seed, must give identical
partitions; prints the seconds of each and the peak GPU memory.

    python benchmarks/gpu_check.py --samples 100000 --components 2000 --iters 1000 --density 0.03

Exits 0 when the partitions are identical, 1 when they differ, 2 when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from bench_merge import synthetic_activations

from spd_math import MergeConfig, ProcessedActivations, merge_iteration


def timed_merge(activations: ProcessedActivations, config: MergeConfig, seed: int, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    history = merge_iteration(activations, config, seed=seed, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return history, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--components", type=int, default=2_000)
    parser.add_argument("--iters", type=int, default=1_000)
    parser.add_argument("--density", type=float, default=0.03)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--continuous", action="store_true", help="continuous mode (activation_threshold: null)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); nothing to compare", file=sys.stderr)
        return 2

    data = synthetic_activations(args.samples, args.components, args.density, args.group_size, args.seed)
    activations = ProcessedActivations(activations=data, labels=[f"m:{i}" for i in range(args.components)])
    config = MergeConfig(activation_threshold=None if args.continuous else 0.01, iters=args.iters)
    print(f"gpu_check: {args.samples:,} samples x {args.components:,} components, {args.iters} iterations, "
          f"{'continuous' if args.continuous else 'threshold 0.01'}, {torch.cuda.get_device_name(args.device)}")

    # Warm-up: CUDA context and kernels load once, outside the timing.
    merge_iteration(ProcessedActivations(activations=data[:4096, :64], labels=activations.labels[:64]),
                    MergeConfig(iters=5), seed=0, device=args.device)
    torch.cuda.reset_peak_memory_stats(args.device)
    on_gpu, gpu_seconds = timed_merge(activations, config, args.seed, args.device)
    peak_gpu_mb = torch.cuda.max_memory_allocated(args.device) / 2**20
    on_cpu, cpu_seconds = timed_merge(activations, config, args.seed, "cpu")

    same_partitions = torch.equal(on_gpu.group_idxs, on_cpu.group_idxs)
    same_pairs = torch.equal(on_gpu.selected_pairs, on_cpu.selected_pairs)
    mdl_gap = float(np.max(np.abs(on_gpu.mdl_losses.numpy() - on_cpu.mdl_losses.numpy()) / np.abs(on_cpu.mdl_losses.numpy())))
    print(f"  cpu   {cpu_seconds:8.2f} s")
    print(f"  gpu   {gpu_seconds:8.2f} s   peak GPU memory {peak_gpu_mb:,.0f} MB   speed-up {cpu_seconds / gpu_seconds:.1f}x")
    print(f"  identical partitions: {same_partitions}, identical pairs: {same_pairs}, max relative MDL difference {mdl_gap:.2e}")
    if not same_partitions:
        first = int(torch.nonzero((on_gpu.group_idxs != on_cpu.group_idxs).any(dim=1))[0])
        print(f"  first differing iteration: {first}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
