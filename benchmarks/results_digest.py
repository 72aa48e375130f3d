"""A digest of everything an experiment's results say, to compare two versions' results exactly.

    python benchmarks/results_digest.py --home /tmp/h1 --experiment default > before.txt
    python benchmarks/results_digest.py --home /tmp/h2 --experiment default > after.txt
    diff before.txt after.txt          # empty: the same partitions, distances, consensus and tables

One line per item: every member's partitions after every merge (hashed as the original's
`[iters, c]` arrays would be, streamed), the normalized ensemble's partitions at every iteration,
the distances of each method, the consensus, and every result table of the experiment (rows sorted,
written as CSV). What differs between any two runs by nature is left out: the lineage tables (run
ids), the `experiments` table's registration time, and file paths. Either storage layout is read
(merge histories as merges, or the previous layout's dense files).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spd_assets.results import ClusteringResults  # noqa: E402

SKIPPED_TABLES = {"materializations", "lineage_edges"}
SKIPPED_COLUMNS = {"experiments": ["registered_at"]}


def _hash(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def _frame_hash(frame: pl.DataFrame) -> str:
    if frame.height:
        frame = frame.sort(frame.columns, nulls_last=True)
    return hashlib.sha256(frame.write_csv().encode()).hexdigest()[:16]


def digest(results: ClusteringResults) -> list[str]:
    lines = []
    for member, history in results.histories.items():
        partitions = hashlib.sha256()
        for row in history.partitions_between():
            partitions.update(row.astype(np.int64).tobytes())
        diagnostics = _hash(*(getattr(history, name).numpy() for name in ("k_groups", "pair_costs", "mdl_losses")
                              if getattr(history, name) is not None))
        lines.append(f"history {member}: {history.c_components} components, {history.n_iters} merges, partitions "
                     f"{partitions.hexdigest()[:16]}, diagnostics {diagnostics}, seed {history.seed}")
    ensemble = results.ensemble.ensemble
    partitions = hashlib.sha256()
    for iteration in range(ensemble.n_iters):
        partitions.update(ensemble.partitions_at(iteration).tobytes())
    lines.append(f"ensemble: members {results.ensemble.members}, missing {results.ensemble.missing}, "
                 f"{len(ensemble.labels)} labels, {ensemble.n_iters} iterations, partitions {partitions.hexdigest()[:16]}, "
                 f"present {_hash(ensemble.present.numpy())}")
    for method, values in results.distances.items():
        lines.append(f"distances {method}: {tuple(values.shape)} {_hash(values.numpy())}")
    consensus = results.consensus
    lines.append(f"consensus: iteration {consensus.iteration} ({consensus.rule}), {consensus.n_clusters} clusters, "
                 f"{_hash(consensus.cluster_of, consensus.stability, consensus.component_stability)}")
    for table, frame in sorted(results.tables.items()):
        if table in SKIPPED_TABLES:
            continue
        frame = frame.drop(SKIPPED_COLUMNS.get(table, []))
        lines.append(f"table {table}: {frame.height} rows, {_frame_hash(frame)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True, help="DAGSTER_HOME of the results")
    parser.add_argument("--experiment", default="default")
    args = parser.parse_args()
    print("\n".join(digest(ClusteringResults.load(args.experiment, home=args.home))))


if __name__ == "__main__":
    main()
