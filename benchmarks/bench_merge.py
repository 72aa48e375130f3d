"""Seconds and peak memory of one merge run on synthetic sparse activations.

    python benchmarks/bench_merge.py --samples 100000 --components 16000 --iters 1000 --density 0.03
    python benchmarks/bench_merge.py --samples 100000 --components 65536 --iters 1000 --density 0.01 --compact

The data: each component fires independently with probability `density`, plus planted
groups of components that fire together on a shared latent feature, so merges find real
structure (as SPD components do) rather than only noise. Values of active entries are
uniform in (threshold, 1]; inactive entries are 0. `--compact` streams the same rows, a
chunk at a time, through `CompactActivationsBuilder`, so the dense float matrix never
exists (the form the model sources produce).

Prints the setup (masks, exact coactivation counts and the first cost bounds: everything
before the first merge), seconds per iteration after it, and the process's peak RSS. Run
it with an older checkout of spd_math on PYTHONPATH to compare engines: the setup is
measured by wrapping whichever state class the engine constructs.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
import torch

import spd_math.merge as merge_module
from spd_math import MergeConfig, ProcessedActivations, merge_iteration

CHUNK_ROWS = 8192


def synthetic_chunks(n_samples: int, n_components: int, density: float, group_size: int, seed: int):
    """`[rows, n_components]` float32 chunks of the synthetic activations, in order (same data for any consumer)."""
    generator = torch.Generator().manual_seed(seed)
    n_groups = n_components // group_size
    # Half of each component's firing comes from its planted group's latent feature.
    feature_rate = density / 2
    noise_rate = density - feature_rate
    for start in range(0, n_samples, CHUNK_ROWS):
        rows = min(CHUNK_ROWS, n_samples - start)
        features = torch.rand((rows, n_groups), generator=generator) < feature_rate
        active = features.repeat_interleave(group_size, dim=1)
        if active.shape[1] < n_components:
            active = torch.cat([active, torch.zeros((rows, n_components - active.shape[1]), dtype=torch.bool)], dim=1)
        active |= torch.rand((rows, n_components), generator=generator) < noise_rate
        values = torch.rand((rows, n_components), generator=generator) * 0.9 + 0.1
        yield values * active


def synthetic_activations(n_samples: int, n_components: int, density: float, group_size: int, seed: int) -> torch.Tensor:
    """`[n_samples, n_components]` float32, about `density` active."""
    activations = torch.zeros((n_samples, n_components), dtype=torch.float32)
    for index, chunk in enumerate(synthetic_chunks(n_samples, n_components, density, group_size, seed)):
        activations[index * CHUNK_ROWS : index * CHUNK_ROWS + chunk.shape[0]] = chunk
    return activations


def compact_activations(n_samples: int, n_components: int, density: float, group_size: int, seed: int, threshold: float):
    from spd_math import CompactActivationsBuilder

    labels = [f"m:{i}" for i in range(n_components)]
    builder = CompactActivationsBuilder(labels, activation_threshold=threshold)
    for chunk in synthetic_chunks(n_samples, n_components, density, group_size, seed):
        builder.add(chunk)
    return builder.build()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_state_class():
    """The engine's state classes, wrapped to record when their construction (the setup) ends."""
    marks: list[float] = []
    if hasattr(merge_module, "_GroupState"):  # the engine before spd_math.state existed
        module, names = merge_module, ["_GroupState"]
    else:
        import spd_math.state as module

        names = ["GroupState", "DenseGroupState"]
    for name in names:
        original = getattr(module, name)

        class Timed(original):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                marks.append(time.perf_counter())

        setattr(module, name, Timed)
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--components", type=int, default=2_000)
    parser.add_argument("--iters", type=int, default=1_000)
    parser.add_argument("--density", type=float, default=0.03)
    parser.add_argument("--group-size", type=int, default=8, help="components per planted group")
    parser.add_argument("--threshold", type=float, default=0.01, help="activation_threshold")
    parser.add_argument("--continuous", action="store_true", help="continuous mode (activation_threshold: null)")
    parser.add_argument("--compact", action="store_true", help="stream the rows into compact (sparse) activations")
    parser.add_argument("--sampler", choices=["range", "mcmc"], default="range")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    if args.compact:
        activations = compact_activations(args.samples, args.components, args.density, args.group_size, args.seed,
                                          args.threshold)
        stored = activations.activations
        input_mb = (stored.values().numel() * stored.values().element_size()
                    + stored.col_indices().numel() * stored.col_indices().element_size()) / 2**20
        density = stored.values().numel() / (args.samples * args.components)
    else:
        data = synthetic_activations(args.samples, args.components, args.density, args.group_size, args.seed)
        activations = ProcessedActivations(activations=data, labels=[f"m:{i}" for i in range(args.components)])
        input_mb = data.numel() * 4 / 2**20
        cutoff = 0 if args.continuous else args.threshold
        density = sum(int((rows > cutoff).sum()) for rows in data.split(8192)) / data.numel()
    generate_s = time.perf_counter() - started
    rss_data = peak_rss_mb()
    config = MergeConfig(
        activation_threshold=None if args.continuous else args.threshold,
        iters=args.iters,
        merge_pair_sampling_method=args.sampler,
        merge_pair_sampling_kwargs={},
    )
    marks = timed_state_class()
    setups, per_iteration, totals = [], [], []
    for repeat in range(args.repeats):
        started = time.perf_counter()
        history = merge_iteration(activations, config, seed=args.seed + repeat, device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        ended = time.perf_counter()
        setups.append(marks[-1] - started)
        per_iteration.append((ended - marks[-1]) / history.n_iters)
        totals.append(ended - started)

    print(f"merge: {args.samples:,} samples x {args.components:,} components, {history.n_iters} iterations, "
          f"{'continuous' if args.continuous else f'threshold {args.threshold}'}, sampler {args.sampler}, "
          f"density {density:.4f}, {'compact' if args.compact else 'dense'} input, device {args.device}")
    print(f"  input                {generate_s:8.2f} s to make; {input_mb:,.0f} MB; peak RSS after it {rss_data:,.0f} MB")
    print(f"  setup, median of {len(setups)}   {statistics.median(setups):8.2f} s   (runs: {', '.join(f'{s:.2f}' for s in setups)})")
    print(f"  per iteration        {statistics.median(per_iteration):8.4f} s   "
          f"(runs: {', '.join(f'{s:.4f}' for s in per_iteration)})")
    print(f"  total, median        {statistics.median(totals):8.2f} s")
    print(f"  peak RSS             {peak_rss_mb():8,.0f} MB   ({peak_rss_mb() - rss_data:,.0f} MB above the input)")
    print(f"  final k {int(history.k_groups[-1])}, MDL {float(history.mdl_losses[0]):.4g} -> {float(history.mdl_losses[-1]):.4g}")
    digest = np.bitwise_xor.reduce((history.group_idxs.numpy().astype(np.int64) * 2654435761).ravel() % (1 << 61))
    print(f"  partitions digest    {int(digest):x}   (equal digests: identical partitions)")


if __name__ == "__main__":
    main()
