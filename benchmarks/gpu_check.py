"""On a machine with CUDA: the merge on the GPU and on the CPU, same input and seed, must give identical
partitions; prints the seconds of each (setup and per iteration), peak GPU memory and peak RSS.

    python benchmarks/gpu_check.py                                   # the default ladder of sizes
    python benchmarks/gpu_check.py --sizes 262144x16000x1000 --compact
    python benchmarks/gpu_check.py --sizes 100000x2000x1000 --continuous
    python benchmarks/gpu_check.py --data source --sizes 100000x16000x1000 --compact

`--data` takes the kinds of `bench_merge.py` (planted, source, zipf, minilm; see there) at each size.

`--sizes` takes SAMPLESxCOMPONENTSxITERS triples (comma-separated). `--compact` streams the
rows into compact (sparse) activations, as the model sources do (`--chunk-device cuda:0`: each
chunk handed over on the GPU, reduced there); otherwise the input is a
dense float32 matrix (skipped, with a note, when it would not fit in host memory). Every
size runs in its own try block: an out-of-memory error is reported and the next size runs.
`--cpu-limit` skips the CPU comparison above that many components (the GPU figures are
still printed).

Exits 0 when every compared run gave identical partitions, 1 when one differed, 2 when there
is no CUDA device.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np
import torch
from bench_merge import DATA_KINDS, INPUT_SECONDS, make_activations, synthetic_activations, timed_state_class

from spd_math import MergeConfig, ProcessedActivations, merge_iteration

DEFAULT_SIZES = "100000x2000x1000,100000x16000x1000,262144x16000x1000,100000x65536x1000"


def timed_merge(activations: ProcessedActivations, config: MergeConfig, seed: int, device: str, marks: list[float]):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    history = merge_iteration(activations, config, seed=seed, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    ended = time.perf_counter()
    setup = marks[-1] - started
    return history, setup, (ended - marks[-1]) / max(history.n_iters, 1)


def host_memory_gb() -> float:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def check_size(n: int, c: int, iters: int, args, marks: list[float]) -> bool | None:
    """Runs one size; True/False: identical partitions or not; None: not compared."""
    threshold = None if args.continuous else args.threshold
    compact = args.compact or args.data == "minilm"
    print(f"\n{args.data} data, {n:,} samples x {c:,} components x {iters} iterations, density {args.density}, "
          f"{'continuous' if args.continuous else f'threshold {threshold}'}, {'compact' if compact else 'dense'} input",
          flush=True)
    started = time.perf_counter()
    if not compact:
        needed_gb = n * c * 4 / 2**30
        if needed_gb > 0.6 * host_memory_gb():
            print(f"  skipped: a dense input of {needed_gb:.0f} GB does not fit in host memory (use --compact)")
            return None
    activations = make_activations(args, n, c)
    split = ", ".join(f"{part} {seconds:.1f} s" for part, seconds in INPUT_SECONDS.items())
    print(f"  input made in {time.perf_counter() - started:.1f} s ({split}): {activations.n_samples:,} x "
          f"{activations.n_components:,}", flush=True)
    config = MergeConfig(activation_threshold=threshold, iters=iters)
    torch.cuda.reset_peak_memory_stats(args.device)
    on_gpu, gpu_setup, gpu_iteration = timed_merge(activations, config, args.seed, args.device, marks)
    peak_gpu_mb = torch.cuda.max_memory_allocated(args.device) / 2**20
    print(f"  gpu   setup {gpu_setup:8.2f} s   {gpu_iteration:.4f} s/iteration   peak GPU memory {peak_gpu_mb:,.0f} MB",
          flush=True)
    if c > args.cpu_limit:
        print(f"  cpu   skipped (more than --cpu-limit {args.cpu_limit} components)")
        return None
    on_cpu, cpu_setup, cpu_iteration = timed_merge(activations, config, args.seed, "cpu", marks)
    same_partitions = torch.equal(on_gpu.merge_pairs, on_cpu.merge_pairs)  # equal merges make equal partitions
    same_pairs = torch.equal(on_gpu.selected_pairs, on_cpu.selected_pairs)
    gap = np.abs(on_gpu.mdl_losses.numpy() - on_cpu.mdl_losses.numpy()) / np.maximum(np.abs(on_cpu.mdl_losses.numpy()), 1e-300)
    print(f"  cpu   setup {cpu_setup:8.2f} s   {cpu_iteration:.4f} s/iteration   "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB")
    print(f"  identical partitions: {same_partitions}, identical pairs: {same_pairs}, "
          f"max relative MDL difference {float(gap.max()):.2e}")
    if not same_partitions:
        common = min(on_gpu.n_iters, on_cpu.n_iters)
        differing = torch.nonzero((on_gpu.merge_pairs[:common] != on_cpu.merge_pairs[:common]).any(dim=1))
        first = int(differing[0]) if differing.numel() else common
        print(f"  first differing iteration: {first}", file=sys.stderr)
    return same_partitions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="SAMPLESxCOMPONENTSxITERS, comma-separated")
    parser.add_argument("--data", choices=DATA_KINDS, default="planted", help="what the activations are (bench_merge.py)")
    parser.add_argument("--density", type=float, default=0.03)
    parser.add_argument("--threshold", type=float, default=0.01, help="activation_threshold")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--continuous", action="store_true", help="continuous mode (activation_threshold: null)")
    parser.add_argument("--compact", action="store_true", help="compact (sparse) input built by streaming rows")
    parser.add_argument("--chunk-device", help="with --compact: the device the builder gets each chunk on "
                        "(e.g. cuda:0, as a model source on the GPU gives them; default cpu)")
    parser.add_argument("--cpu-limit", type=int, default=70_000, help="compare with the CPU up to this many components")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); nothing to compare", file=sys.stderr)
        return 2
    print(f"gpu_check on {torch.cuda.get_device_name(args.device)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    marks = timed_state_class()
    # Warm-up: CUDA context and kernels load once, outside the timing.
    warm = synthetic_activations(4096, 64, 0.1, 8, 0)
    merge_iteration(ProcessedActivations(warm, [f"m:{i}" for i in range(64)]), MergeConfig(iters=5), seed=0, device=args.device)
    results = []
    for size in args.sizes.split(","):
        n, c, iters = (int(part) for part in size.lower().split("x"))
        try:
            results.append(check_size(n, c, iters, args, marks))
        except torch.cuda.OutOfMemoryError as error:
            print(f"  out of GPU memory: {error}")
            results.append(None)
        torch.cuda.empty_cache()
    compared = [r for r in results if r is not None]
    print(f"\n{len(compared)} size(s) compared, {sum(compared)} identical")
    return 0 if all(compared) else 1


if __name__ == "__main__":
    sys.exit(main())
