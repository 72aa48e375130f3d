"""Ensemble members in parallel without Dagster: a process pool over devices, for scripts and notebooks.

`BatchProcessor(n_workers, devices).process_all_batches(batches, config)` merges each batch file as
`process_data_batch` does (the `files` source's reader, the member seed of the file's partition key), in
worker processes that each lease a device exactly as the pipeline's steps do: an exclusive lock file per
device under the results folder of the Dagster instance (`spd_assets.deployment.devices`). A GPU a running
pipeline holds is therefore never shared, and the pipeline waits for the devices held here.

Nothing is recorded in Dagster: no lineage, no retries, no UI; the histories come back as values (save them
with `save_merge_history`). The pipeline (`cluster_analysis_pipeline`, `spd-cluster run`) is the tool when
those matter.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

from spd_assets.config import ExperimentConfig
from spd_assets.deployment.devices import lease_device, validate_devices
from spd_assets.deployment.home import dagster_home, results_store
from spd_assets.deployment.settings import load_settings
from spd_assets.errors import BatchProcessingError, DeviceError
from spd_assets.processing import ConfigLike, experiment_config, process_data_batch
from spd_math import MergeHistory

__all__ = ["BatchProcessor"]

PathLike = str | os.PathLike[str]
# Who holds a lease, as the lease files and log show it (a pipeline step shows its run and step key).
LEASE_HOLDER = "batch_processor"


def _merge_on_leased_device(config: ExperimentConfig, batch_path: str, devices: list[str], lease_dir: str,
                            timeout_s: float) -> MergeHistory:
    """One batch's merge history, computed while holding one of `devices` (runs in a worker process)."""
    holder = {"run_id": None, "step_key": LEASE_HOLDER, "partition": Path(batch_path).stem, "batch": batch_path}
    with lease_device(devices, Path(lease_dir), holder=holder, timeout_s=timeout_s) as lease:
        return process_data_batch(config, batch_path, device=lease.torch_device)


class BatchProcessor:
    """Merge histories of many batch files at once, each on a device leased like the pipeline's steps.

    Parameters
    ----------
    n_workers : int, optional
        Worker processes (default: one per device). More workers than devices wait for a free device.
        With one worker the batches are merged one after another in this process.
    devices : sequence of str, optional
        Device names (`"cuda:0"`, `"cpu:0"`, ...); default: the deployment's devices at `home`
        (`$DAGSTER_HOME/spd_cluster.yaml`, `SPD_CLUSTER_DEVICES`), as the pipeline leases them.
    home : str or path, optional
        The Dagster instance whose results folder holds the device leases (default: `$DAGSTER_HOME`, else
        the project's `dagster_home/`): the one a running pipeline uses, so that the two never share a device.
    lease_timeout_s : float, optional
        How long a batch waits for a free device (default: the deployment's `device_lease_timeout_s`).

    Raises
    ------
    DeviceError
        Device names that are not `cuda:<i>` / `cpu:<i>`, or repeated.
    ValueError
        `n_workers` below 1.

    Notes
    -----
    Workers are started with the `spawn` method (safe with CUDA and threads), which re-imports the calling
    script: a script that runs a `BatchProcessor` needs the usual `if __name__ == "__main__":` guard.
    A Dagster pool limit below the number of devices is not applied here; every device is still held by
    one process at a time.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> from spd_assets import BatchProcessor
    >>> folder = Path(tempfile.mkdtemp())
    >>> for index in range(2):
    ...     rows = np.random.default_rng(index).random((32, 6), dtype=np.float32)
    ...     np.savez(folder / f"b{index}.npz", **{"mlp.up": rows})
    >>> config = {"source": {"kind": "files", "directory": str(folder)}, "merge_config": {"iters": 3}}
    >>> processor = BatchProcessor(1, ["cpu:0"], home=folder / "home")
    >>> histories = processor.process_all_batches(sorted(folder.glob("*.npz")), config)
    >>> [history.n_iters for history in histories]
    [3, 3]
    """

    def __init__(self, n_workers: int | None = None, devices: Sequence[str] | None = None, *,
                 home: PathLike | None = None, lease_timeout_s: float | None = None) -> None:
        self.home = Path(home).resolve() if home is not None else dagster_home()
        settings = load_settings(self.home) if devices is None or lease_timeout_s is None else None
        if isinstance(devices, str):
            raise DeviceError(f"devices: expected a list of names like ['cuda:0'], got the string {devices!r}")
        self.devices = validate_devices(list(devices)) if devices is not None else settings.device_names()
        if n_workers is not None and (isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1):
            raise ValueError(f"n_workers: expected a whole number of at least 1, got {n_workers!r}")
        self.n_workers = n_workers if n_workers is not None else len(self.devices)
        self.lease_timeout_s = lease_timeout_s if lease_timeout_s is not None else settings.device_lease_timeout_s
        self.lease_dir = results_store(self.home).lease_dir

    def __repr__(self) -> str:
        return f"BatchProcessor({self.n_workers} workers, devices {self.devices}, leases in {str(self.lease_dir)!r})"

    def process_all_batches(self, batches: Sequence[PathLike], config: ConfigLike) -> list[MergeHistory]:
        """The merge history of every batch file, in the order given.

        Parameters
        ----------
        batches : sequence of str or path
            Batch files (`.safetensors`, `.npz`, `.pt`), one per ensemble member; each member's seed is
            `config.member_seed(<file name without suffix>)`, as in the pipeline.
        config : ExperimentConfig, mapping or path
            The experiment (merge config, seq mode, base seed; a `files` source's `value_range` and `layout`).

        Returns
        -------
        list of MergeHistory
            Equal to the pipeline's `merge_history` of the same members.

        Raises
        ------
        BatchProcessingError
            After every batch has run, when any failed: the message names each failed batch and its error;
            `completed` holds the histories of those that finished.
        """
        config = experiment_config(config)
        if isinstance(batches, (str, os.PathLike)):
            raise TypeError(f"batches: expected a sequence of batch files, got the single path {str(batches)!r}")
        paths = [str(batch) for batch in batches]
        if not paths:
            raise ValueError("batches: expected at least one batch file, got none")
        arguments = (self.devices, str(self.lease_dir), self.lease_timeout_s)
        results: dict[int, MergeHistory] = {}
        failures: dict[int, BaseException] = {}
        if self.n_workers == 1 or len(paths) == 1:
            for index, path in enumerate(paths):
                try:
                    results[index] = _merge_on_leased_device(config, path, *arguments)
                except Exception as error:  # reported with the others below, naming the batch
                    failures[index] = error
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(self.n_workers, len(paths)), mp_context=context) as pool:
                futures: dict[int, Future] = {
                    index: pool.submit(_merge_on_leased_device, config, path, *arguments)
                    for index, path in enumerate(paths)
                }
                for index, future in futures.items():
                    try:
                        results[index] = future.result()
                    except Exception as error:  # reported with the others below, naming the batch
                        failures[index] = error
        if failures:
            lines = "\n".join(f"  - {paths[index]}: {type(error).__name__}: {error}"
                              for index, error in sorted(failures.items()))
            raise BatchProcessingError(f"{len(failures)} of {len(paths)} batches failed:\n{lines}",
                                       completed={paths[index]: history for index, history in sorted(results.items())})
        return [results[index] for index in range(len(paths))]
