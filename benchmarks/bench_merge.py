"""Seconds and peak memory of one merge run on synthetic sparse activations.

    python benchmarks/bench_merge.py --samples 100000 --components 2000 --iters 1000 --density 0.03

The data: each component fires independently with probability `density`, plus planted
groups of components that fire together on a shared latent feature, so merges find real
structure (as SPD components do) rather than only noise. Values of active entries are
uniform in (threshold, 1]; inactive entries are 0.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from spd_math import MergeConfig, ProcessedActivations, merge_iteration


def synthetic_activations(
    n_samples: int, n_components: int, density: float, group_size: int, seed: int
) -> torch.Tensor:
    """`[n_samples, n_components]` float32, about `density` active, built in chunks to bound memory."""
    generator = torch.Generator().manual_seed(seed)
    n_groups = n_components // group_size
    # Half of each component's firing comes from its planted group's latent feature.
    feature_rate = density / 2
    noise_rate = density - feature_rate
    activations = torch.zeros((n_samples, n_components), dtype=torch.float32)
    chunk = 8192
    for start in range(0, n_samples, chunk):
        rows = min(chunk, n_samples - start)
        features = torch.rand((rows, n_groups), generator=generator) < feature_rate
        active = features.repeat_interleave(group_size, dim=1)
        if active.shape[1] < n_components:
            active = torch.cat([active, torch.zeros((rows, n_components - active.shape[1]), dtype=torch.bool)], dim=1)
        active |= torch.rand((rows, n_components), generator=generator) < noise_rate
        values = torch.rand((rows, n_components), generator=generator) * 0.9 + 0.1
        activations[start : start + rows] = values * active
    return activations


def active_fraction(data: torch.Tensor, threshold: float) -> float:
    """Fraction of entries above the threshold, counted in chunks (no full-size temporary)."""
    active = sum(int((rows > threshold).sum()) for rows in data.split(8192))
    return active / data.numel()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--components", type=int, default=2_000)
    parser.add_argument("--iters", type=int, default=1_000)
    parser.add_argument("--density", type=float, default=0.03)
    parser.add_argument("--group-size", type=int, default=8, help="components per planted group")
    parser.add_argument("--threshold", type=float, default=0.01, help="activation_threshold; 'none' for continuous mode")
    parser.add_argument("--continuous", action="store_true", help="continuous mode (activation_threshold: null)")
    parser.add_argument("--sampler", choices=["range", "mcmc"], default="range")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.perf_counter()
    data = synthetic_activations(args.samples, args.components, args.density, args.group_size, args.seed)
    generate_s = time.perf_counter() - started
    rss_data = peak_rss_mb()
    activations = ProcessedActivations(activations=data, labels=[f"m:{i}" for i in range(args.components)])
    config = MergeConfig(
        activation_threshold=None if args.continuous else args.threshold,
        iters=args.iters,
        merge_pair_sampling_method=args.sampler,
        merge_pair_sampling_kwargs={},
    )
    seconds = []
    for repeat in range(args.repeats):
        started = time.perf_counter()
        history = merge_iteration(activations, config, seed=args.seed + repeat, device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)

    print(f"merge: {args.samples:,} samples x {args.components:,} components, {history.n_iters} iterations, "
          f"{'continuous' if args.continuous else f'threshold {args.threshold}'}, sampler {args.sampler}, "
          f"density {active_fraction(data, 0 if args.continuous else args.threshold):.4f}, device {args.device}")
    print(f"  data generation      {generate_s:8.2f} s   (RSS after: {rss_data:,.0f} MB, of which the input matrix "
          f"{data.numel() * 4 / 2**20:,.0f} MB)")
    print(f"  merge, median of {len(seconds)}  {statistics.median(seconds):8.2f} s   (runs: {', '.join(f'{s:.2f}' for s in seconds)})")
    print(f"  peak RSS             {peak_rss_mb():8,.0f} MB")
    print(f"  final k {int(history.k_groups[-1])}, MDL {float(history.mdl_losses[0]):.4g} -> {float(history.mdl_losses[-1]):.4g}")


if __name__ == "__main__":
    main()
