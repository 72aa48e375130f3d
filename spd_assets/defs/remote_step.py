"""The entry of a member's device step on a SLURM node: `python -m spd_assets.defs.remote_step`.

Started by the step's job (see `spd_assets.defs.slurm`), with the Pipes bootstrap variables in
its environment. It reads the Pipes context (the step, the member, the experiment's config, the
results root and its output folder, all on the shared filesystem), loads the step's input from
the results root where the IO managers wrote it, runs the same step function as a local run on
this node's device (the first GPU SLURM granted, else the CPU), writes the value and tables into
its output folder, and reports its logs and the materialization's metadata over Pipes.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import torch

# The steps that run remotely: their input asset, and their value asset.
REMOTE_STEPS = {"merge_history": ("component_activations", "merge_history")}
VALUE_FILE = "value"  # + the value format's suffix


def node_device() -> torch.device:
    """The GPU SLURM granted this job (it sets CUDA_VISIBLE_DEVICES), else the CPU."""
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


def allocated_cpus() -> int | None:
    """The CPUs SLURM allocated to this job on this node (other jobs may share the node's other cores)."""
    for variable in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        value = os.environ.get(variable, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def pipes_metadata(metadata: dict) -> dict:
    """Step metadata as Pipes metadata values (Markdown and figures rendered as Markdown, lists as JSON)."""
    from spd_assets.analysis.plots import markdown_image
    from spd_assets.defs import steps

    converted = {}
    for name, value in metadata.items():
        if isinstance(value, steps.Image):
            converted[name] = {"type": "md", "raw_value": markdown_image(value.png, value.title)}
        elif isinstance(value, steps.Markdown):
            converted[name] = {"type": "md", "raw_value": str(value)}
        elif isinstance(value, Path):
            converted[name] = {"type": "path", "raw_value": str(value)}
        elif isinstance(value, (list, dict)):
            converted[name] = {"type": "json", "raw_value": value}
        elif isinstance(value, float):
            converted[name] = {"type": "float", "raw_value": value}
        elif isinstance(value, bool):
            converted[name] = {"type": "bool", "raw_value": value}
        elif isinstance(value, int):
            converted[name] = {"type": "int", "raw_value": value}
        else:
            converted[name] = {"type": "text", "raw_value": str(value)}
    return converted


def run_remote_step(pipes) -> None:
    from spd_assets.config import ExperimentConfig
    from spd_assets.defs import steps
    from spd_assets.defs.slurm import DONE_FILE
    from spd_assets.storage.checkpoints import StoppedAfterCheckpoint
    from spd_assets.storage.progress import PROGRESS_UNITS, ProgressReporter, progress_path
    from spd_assets.storage.store import ResultsStore
    from spd_assets.storage.values import value_format
    from spd_math import MergeHistory, ProcessedActivations

    extras = pipes.extras
    step, member = extras["step"], extras["member"]
    if step not in REMOTE_STEPS:
        raise ValueError(f"remote step {step!r} is not one of {sorted(REMOTE_STEPS)}")
    config = ExperimentConfig.model_validate(json.loads(extras["experiment_config_json"]))
    store = ResultsStore(Path(extras["results_root"]))
    output = Path(extras["output_folder"])
    device = node_device()
    cpus = allocated_cpus()
    if device.type == "cpu" and cpus is not None:
        torch.set_num_threads(cpus)  # torch's default, every core of the node, would contend with the node's other jobs
    input_asset, value_asset = REMOTE_STEPS[step]
    activations_format = value_format(ProcessedActivations)
    activations = activations_format.load(store.value_path(config.name, input_asset, member, activations_format.suffix))
    pipes.log.info(f"{member}: merging {activations.n_samples} samples x {activations.n_components} components on "
                   f"{device} of {socket.gethostname()} (SLURM job {os.environ.get('SLURM_JOB_ID', '?')})")
    reporter = ProgressReporter(progress_path(store, config.name, member), pipes.log.info, experiment=config.name,
                                member=member, step="merge", unit=PROGRESS_UNITS["merge"])
    checkpoints = steps.member_checkpoints(store, activations, config, member, float(extras["checkpoint_interval_s"]),
                                           pipes.log.info, pipes.log.warning)
    checkpoints.checkpoint_on_sigterm()  # SLURM's notice before a time limit, preemption or requeue ends the job
    try:
        result = steps.merge_history(activations, config, member, device, reporter, checkpoints)
    except StoppedAfterCheckpoint as stopped:
        # Ended without closing the Pipes session: a requeued job opens it again, and what it reports (its results
        # included) must still be read; a closed session would drop it. SLURM's job state says how the job ended.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(stopped.exit_status)
    finally:
        reporter.close()
    history = result.value
    pipes.log.info(f"merged {history.c_components} components over {history.n_iters} iterations in "
                   f"{result.metadata['seconds']:.2f} s on {device}")
    history_format = value_format(MergeHistory)
    history_format.save(output / f"{VALUE_FILE}{history_format.suffix}", history)
    for table, frame in result.tables.items():
        frame.write_parquet(output / f"{table}.parquet")
    metadata = {**result.metadata, "device": str(device), "node": socket.gethostname()}
    pipes.report_asset_materialization(asset_key="/".join([config.name, value_asset]),
                                       metadata=pipes_metadata(metadata))
    # Written last: its presence says every output above is complete.
    (output / DONE_FILE).write_text(json.dumps({"step": step, "member": member, "tables": sorted(result.tables),
                                                "finished": time.time()}))


def main() -> int:
    from dagster_pipes import PipesDefaultContextLoader, PipesDefaultMessageWriter, open_dagster_pipes

    with open_dagster_pipes(context_loader=PipesDefaultContextLoader(),
                            message_writer=PipesDefaultMessageWriter()) as pipes:
        run_remote_step(pipes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
