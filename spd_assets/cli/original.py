"""`spd-clustering`: the original research code's command line, running the same thing as `spd-cluster run`.

    spd-clustering --config PIPELINE_CONFIG [--n-runs N] [--distances-methods a,b] [--dataset-streaming] ...

`--config` takes the original's pipeline config (or any config `spd-cluster run` takes);
`--n-runs` sets the ensemble size and `--distances-methods` the distance methods, as in the
original. `--no-local` submits each member's merge to SLURM, as the original did (this
invocation runs with `executor: slurm`; the pipeline's `slurm_partition` and
`slurm_job_name_prefix` name the partition and jobs); `--local` runs members here even where
the deployment says slurm. Flags for wandb and the original's local parallelism are accepted and
reported as not used: members run as Dagster runs, as many at once as there are devices.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spd_assets.config.original import DISTANCE_ALIASES

# The original's flags that have no meaning here (wandb logging, SLURM submission, its own process pools).
NOT_USED_FLAGS = ("wandb_project", "wandb_entity", "local_clustering_parallel", "local_calc_distances_parallel",
                  "track_resources_calc_distances")


def parser() -> argparse.ArgumentParser:
    """The original `spd-clustering` command line's arguments."""
    arguments = argparse.ArgumentParser(
        prog="spd-clustering",
        description="Run a clustering ensemble from the original research code's pipeline config "
                    "(the same as `spd-cluster run --config`). Flags override the config's values.",
    )
    arguments.add_argument("--config", required=True, type=Path, help="pipeline config (or any config spd-cluster takes)")
    arguments.add_argument("--n-runs", type=int, help="ensemble size (overrides n_runs)")
    arguments.add_argument("--distances-methods", help="comma-separated distance methods, e.g. perm_invariant_hamming,matching_dist")
    arguments.add_argument("--dataset-streaming", action="store_true", help="stream lm datasets (spd source)")
    arguments.add_argument("--wandb-project", default=None, help="not used here (no wandb logging)")
    arguments.add_argument("--wandb-entity", default=None, help="not used here")
    arguments.add_argument("--local", action=argparse.BooleanOptionalAction, default=None,
                           help="--no-local: submit each member's merge to SLURM (executor slurm); --local: run "
                                "members on this machine (default: the deployment's executor)")
    arguments.add_argument("--local-clustering-parallel", action="store_true", help="not used here: members run in "
                           "parallel up to the number of devices")
    arguments.add_argument("--local-calc-distances-parallel", action="store_true", help="not used here")
    arguments.add_argument("--track-resources-calc-distances", action="store_true", help="not used here")
    return arguments


def main(argv: list[str] | None = None) -> int:
    """`spd-clustering`: the original command line, running what `spd-cluster run --config` runs."""
    args = parser().parse_args(argv)
    if args.n_runs is not None and args.n_runs < 1:
        print(f"spd-clustering: --n-runs: expected a positive number, got {args.n_runs}", file=sys.stderr)
        return 2
    overrides = []
    if args.n_runs is not None:
        overrides.append(f"source.n_members={args.n_runs}")
    if args.distances_methods is not None:
        methods = [method.strip() for method in args.distances_methods.split(",") if method.strip()]
        methods = list(dict.fromkeys(DISTANCE_ALIASES.get(method, method) for method in methods))
        overrides.append(f"distance_methods={json.dumps(methods)}")
    if args.dataset_streaming:
        overrides.append("source.dataset_streaming=true")
    given = [flag for flag in NOT_USED_FLAGS if getattr(args, flag) not in (None, False)]
    from spd_assets.cli.run import run_config_file
    from spd_assets.deployment.settings import load_settings

    executor = None  # the deployment's
    if args.local is False:
        executor = "slurm"
    elif args.local and load_settings().executor == "slurm":
        executor = "in_process"
    return run_config_file(args.config, overrides, program="spd-clustering", executor=executor,
                           not_used_flags=[f"--{flag.replace('_', '-')}" for flag in given])


if __name__ == "__main__":
    sys.exit(main())
