"""What resuming a merge from its checkpoint costs, against the clean run it stands in for.

One clean merge to the end takes a checkpoint when `--at` of its merges are done; the merge is then
resumed from that checkpoint (as a re-run after kill -9 at that point would): set-up, replay of the
checkpoint's merges, and the merges left are timed apart, and the resumed history is compared with the
clean one (it must be identical). Prints the resumed run's time as a share of the clean run's merge time.

    python benchmarks/bench_resume.py --data source --samples 100000 --components 16000 --compact
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_merge import DATA_KINDS, make_activations, peak_rss_mb

from spd_math import MergeConfig, merge_iteration
from spd_math.checkpoint import MergeCheckpoint


class CheckpointAt:
    """Says a checkpoint is due once, after `at` merges; keeps it."""

    def __init__(self, at: int) -> None:
        self.at, self.merges, self.saved = at, 0, None

    def due(self) -> bool:
        self.merges += 1
        return self.merges == self.at

    def save(self, checkpoint: MergeCheckpoint) -> None:
        self.saved = checkpoint


class Timed:
    """Progress callback noting when the first merge after set-up (or replay) was done."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first = None

    def __call__(self, where) -> None:
        if self.first is None:
            self.first = time.perf_counter() - self.started - where.seconds  # set-up (+ replay) before the loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="source", choices=DATA_KINDS)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--components", type=int, default=4_000)
    parser.add_argument("--density", type=float, default=0.03)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.01)
    parser.add_argument("--compact", action="store_true")
    parser.add_argument("--at", type=float, default=0.7, help="share of the merges done at the checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    activations = make_activations(args, args.samples, args.components)
    c = activations.n_components
    config = MergeConfig(activation_threshold=args.threshold, iters=None)
    at = max(1, int(args.at * (c - 3)))
    print(f"data {args.data}: {activations.n_samples:,} samples x {c:,} components, merged to the end; "
          f"checkpoint after {at:,} merges ({args.at:.0%})", flush=True)

    sink, clean_timing = CheckpointAt(at), Timed()
    started = time.perf_counter()
    clean = merge_iteration(activations, config, seed=args.seed, checkpoints=sink, progress=clean_timing)
    clean_total = time.perf_counter() - started
    clean_setup = clean_timing.first
    clean_merging = clean_total - clean_setup
    print(f"clean:   {clean_total:8.1f} s  (set-up {clean_setup:.1f} s, merging {clean_merging:.1f} s, "
          f"{clean.n_iters:,} merges)", flush=True)

    setup_only = Timed()
    started = time.perf_counter()
    merge_iteration(activations, MergeConfig(activation_threshold=args.threshold, iters=1), seed=args.seed,
                    progress=setup_only)
    setup = setup_only.first
    resumed_timing = Timed()
    started = time.perf_counter()
    resumed = merge_iteration(activations, config, seed=args.seed, resume_from=sink.saved, progress=resumed_timing)
    resumed_total = time.perf_counter() - started
    before_loop = resumed_timing.first
    replay = before_loop - setup
    rest = resumed_total - before_loop
    identical = all(torch.equal(getattr(clean, name), getattr(resumed, name))
                    for name in ("selected_pairs", "pair_costs", "mdl_losses", "k_groups"))
    print(f"resumed: {resumed_total:8.1f} s  (set-up {setup:.1f} s, replay of {at:,} merges {replay:.1f} s, "
          f"{clean.n_iters - at:,} merges left {rest:.1f} s)")
    print(f"resumed merge time / clean merge time: {(replay + rest) / clean_merging:.3f} "
          f"(replay alone {replay / clean_merging:.3f}); identical history: {identical}; peak RSS {peak_rss_mb():,.0f} MB")


if __name__ == "__main__":
    main()
