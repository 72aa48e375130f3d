"""Wall time of merging an ensemble's batch files without Dagster (`BatchProcessor`) and through the pipeline.

    python benchmarks/bench_batch_processor.py --members 4 --workers 1 2 --iters 200

Writes `--members` batch files of the default synthetic model (about 600 components, 3,072 tokens each) to a
temporary folder, then, each in a fresh temporary DAGSTER_HOME: `BatchProcessor(w, cpu:0..w-1)` for each
worker count (1 runs in this process), and `cluster_analysis_pipeline` on the same files with `parallel` = the
largest worker count. Prints seconds per run and whether every history equals the pipeline's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_batches(folder: Path, members: int, batch_size: int) -> list[Path]:
    from spd_assets.config.sources import SyntheticParams
    from spd_assets.sources.synthetic import build_model, generate_batch

    model = build_model(SyntheticParams())
    paths = []
    for index in range(members):
        batch = generate_batch(model, seed=index, batch_size=batch_size)
        paths.append(folder / f"member_{index:03d}.npz")
        np.savez(paths[-1], **{name: batch[name].numpy() for name in sorted(batch)})
    return paths


def same(ours, theirs) -> bool:
    return ours.labels == theirs.labels and all(
        torch.equal(getattr(ours, name), getattr(theirs, name)) for name in ("group_idxs", "pair_costs", "mdl_losses"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    arguments = parser.parse_args()

    from spd_assets import BatchProcessor, cluster_analysis_pipeline

    folder = Path(tempfile.mkdtemp(prefix="bench_batch_processor_"))
    (folder / "batches").mkdir()
    batches = write_batches(folder / "batches", arguments.members, arguments.batch_size)
    config = {"name": "bench", "source": {"kind": "files", "directory": str(folder / "batches")},
              "merge_config": {"iters": arguments.iters}}
    print(f"{arguments.members} batch files, {arguments.iters} merges each, {os.cpu_count()} CPUs")
    histories = {}
    for workers in arguments.workers:
        home = folder / f"home_{workers}"
        started = time.perf_counter()
        histories[workers] = BatchProcessor(workers, [f"cpu:{i}" for i in range(workers)],
                                            home=home).process_all_batches(batches, config)
        print(f"BatchProcessor, {workers} worker(s): {time.perf_counter() - started:.1f} s")

    parallel = max(arguments.workers)
    home = folder / "home_pipeline"
    os.environ["SPD_CLUSTER_DEVICES"] = ",".join(f"cpu:{i}" for i in range(parallel))
    started = time.perf_counter()
    results = cluster_analysis_pipeline(config, home=home, parallel=parallel, verbose=False)
    print(f"cluster_analysis_pipeline, parallel {parallel}: {time.perf_counter() - started:.1f} s "
          "(all assets: histories, ensemble, distances, consensus, explorer, tables)")
    equal = all(same(ours, results.histories[path.stem]) for run in histories.values()
                for ours, path in zip(run, batches))
    print(f"every history equals the pipeline's: {equal}")


if __name__ == "__main__":
    main()
