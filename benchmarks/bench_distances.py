"""Seconds and peak memory of `compute_distances` on synthetic ensemble merge histories.

    python benchmarks/bench_distances.py --members 10 --iters 1000 --components 4000 --merge-bias 0.7

Each member is a merge run from singletons: every iteration merges two groups of the
previous partition. With probability `--merge-bias` the pair is two groups sharing a
planted cluster (so members partly agree, as real ensemble members do), otherwise it is
a uniformly random pair of groups; `--merge-bias 0` is the worst case for the size of
the blocks the distances must solve. Groups are numbered by their smallest member, as in
a merge history.

To compare two checkouts of spd_math on the same input, run one with `--save FILE` and the
other with `--compare FILE` (each with its checkout first on PYTHONPATH): the second run
reports whether every distance is identical.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np

import spd_math
from spd_math.distances import DISTANCE_METHODS, compute_distances


def synthetic_merges(n_members: int, n_iters: int, n_components: int, merge_bias: float, cluster_size: int, seed: int) -> np.ndarray:
    """`[n_members, n_iters, n_components]` int64 group ids after each merge."""
    if n_iters >= n_components:
        raise SystemExit(f"--iters must be below --components ({n_components}): each iteration removes one group")
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, max(1, n_components // cluster_size), size=n_components)
    merges = np.empty((n_members, n_iters, n_components), dtype=np.int64)
    for member in range(n_members):
        groups = np.arange(n_components)
        for t in range(n_iters):
            pair = None
            if rng.random() < merge_bias:
                item = rng.integers(n_components)
                mates = np.flatnonzero((cluster == cluster[item]) & (groups != groups[item]))
                if mates.size:
                    pair = (groups[item], groups[rng.choice(mates)])
            if pair is None:
                pair = rng.choice(n_components - t, size=2, replace=False)
            keep, gone = min(pair), max(pair)
            # Ids stay 0..k-1 in order of smallest member: the merged group keeps the smaller id.
            groups[groups == gone] = keep
            groups[groups > gone] -= 1
            merges[member, t] = groups
    return merges


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--iters", type=int, default=1_000)
    parser.add_argument("--components", type=int, default=4_000)
    parser.add_argument("--merge-bias", "-p", type=float, default=0.7, help="probability that a merge stays inside a planted cluster")
    parser.add_argument("--cluster-size", type=int, default=16, help="mean items per planted cluster")
    parser.add_argument("--methods", choices=["both", *DISTANCE_METHODS], default="both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", metavar="FILE", help="write the distances to FILE (.npz) for a later --compare")
    parser.add_argument("--compare", metavar="FILE", help="check the distances equal those saved in FILE by --save")
    args = parser.parse_args()

    rss_imports = peak_rss_mb()
    started = time.perf_counter()
    merges = synthetic_merges(args.members, args.iters, args.components, args.merge_bias, args.cluster_size, args.seed)
    print(
        f"{args.members} members x {args.iters} iterations x {args.components} components, merge bias {args.merge_bias}, "
        f"cluster size {args.cluster_size}, seed {args.seed}: generated in {time.perf_counter() - started:.1f} s, "
        f"peak RSS {peak_rss_mb():.0f} MB ({rss_imports:.0f} MB after imports); spd_math from {spd_math.__file__}"
    )
    methods = DISTANCE_METHODS if args.methods == "both" else (args.methods,)
    print(f"{'method':<24}{'median s':>10}{'min s':>9}{'max s':>9}{'peak RSS MB':>13}")
    total = 0.0
    results = {}
    for method in methods:
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            results[method] = compute_distances(merges, method).numpy()
            seconds.append(time.perf_counter() - started)
        total += statistics.median(seconds)
        print(f"{method:<24}{statistics.median(seconds):>10.2f}{min(seconds):>9.2f}{max(seconds):>9.2f}{peak_rss_mb():>13.0f}")
    print(f"{'total (medians)':<24}{total:>10.2f}")
    if args.save:
        np.savez_compressed(args.save, **results)
        print(f"distances saved to {args.save}")
    if args.compare:
        with np.load(args.compare) as saved:
            for method, result in results.items():
                same = method in saved.files and np.array_equal(saved[method], result)
                print(f"{method}: {'identical to' if same else 'DIFFERENT FROM'} {args.compare}")


if __name__ == "__main__":
    main()
