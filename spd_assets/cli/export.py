"""`spd-cluster export`: an experiment's stored results in the formats the researchers' own tools read.

    spd-cluster export original --experiment NAME --out DIR [--spd-run ENTITY/PROJECT/RUN]
    spd-cluster export spd-app  --experiment NAME --out FILE [--consensus | --member M --iteration N]
                                [--spd-run ENTITY/PROJECT/RUN] [--notes TEXT]

`original` writes the original pipeline's ensemble folder, run folders and registry rows under
DIR (laid out as the original's `SPD_OUT_DIR`); `spd-app` writes the cluster mapping JSON the
SPD app loads. Both read the stored results (`ClusteringResults`); nothing is recomputed but
the original's ensemble array, which follows the original's own rule.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spd_assets.errors import ExportError, SpdClusterError


def add_export_parser(commands) -> None:
    """The `export` command and its two subcommands."""
    export = commands.add_parser("export", help="write results for the original pipeline's scripts or the SPD app")
    targets = export.add_subparsers(dest="target", required=True)
    original = targets.add_parser("original", help="the original pipeline's ensemble folder, run folders and registry "
                                  "rows, under DIR laid out as the original's SPD_OUT_DIR")
    original.add_argument("--experiment", default="default")
    original.add_argument("--out", type=Path, required=True, help="output root (the original's SPD_OUT_DIR)")
    original.add_argument("--spd-run", help="ENTITY/PROJECT/RUN: the SPD run the run configs name as model_path "
                          "(default: the source's model_path when it is a wandb path)")
    app = targets.add_parser("spd-app", help="the cluster mapping JSON the SPD app loads")
    app.add_argument("--experiment", default="default")
    app.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    which = app.add_mutually_exclusive_group()
    which.add_argument("--consensus", action="store_true", help="the consensus clusters (the default)")
    which.add_argument("--member", help="one member's groups (its partition key); needs --iteration")
    app.add_argument("--iteration", type=int, help="with --member: after which merge (0-based)")
    app.add_argument("--spd-run", help="ENTITY/PROJECT/RUN the app has loaded (default: from the source's wandb "
                     "model_path)")
    app.add_argument("--notes", help="the mapping's notes (default: empty for a member; how the consensus was taken)")


def run_export(args: argparse.Namespace) -> int:
    """Dispatch `spd-cluster export ...`; errors are printed without a traceback (exit 1)."""
    from spd_assets.deployment.home import point_at_instance

    home = point_at_instance()
    try:
        if args.target == "original":
            folder = export_original(args.experiment, args.out, spd_run=args.spd_run, home=home,
                                     announce=lambda line: print(line, flush=True),
                                     warn=lambda line: print(line, file=sys.stderr, flush=True))
            print(f"spd-cluster export: the original's ensemble folder of {args.experiment!r}: {folder.ensemble_dir}")
            print(f"  runs: {folder.run_dirs[0].parent} ({len(folder.run_dirs)}); registry: {folder.registry}")
            return 0
        if args.member is None and args.iteration is not None:
            raise ExportError("--iteration goes with --member; the consensus is at the iteration its rule chose")
        if args.member is not None and args.iteration is None:
            raise ExportError("--member needs --iteration (after which merge, 0-based)")
        path, mapping = export_spd_app(args.experiment, args.out, member=args.member, iteration=args.iteration,
                                       spd_run=args.spd_run, notes=args.notes, home=home)
        clustered = sum(cluster is not None for cluster in mapping["clusters"].values())
        print(f"spd-cluster export: {len(mapping['clusters'])} components ({clustered} in clusters) for "
              f"{mapping['spd_run']} at iteration {mapping['n_iterations']}: {path}")
        return 0
    except (SpdClusterError, ValueError) as error:
        print(f"spd-cluster export: {error}", file=sys.stderr)
        return 1


def export_original(experiment: str, out: Path, *, spd_run: str | None = None, home: Path | None = None,
                    announce=lambda line: None, warn=lambda line: None):
    """Write the experiment's stored results as the original pipeline's folders under `out`, after announcing
    their size (the original stores every partition of every member: iterations x components per member), and
    warning when the run configs can name no wandb SPD run (the original's scripts then refuse the folder)."""
    from spd_assets.results import ClusteringResults
    from spd_assets.storage.original_export import original_folder_bytes, spd_run_of, write_original_ensemble

    results = ClusteringResults.load(experiment, home=home)
    source = _source_of(results.config)
    export = ensemble_export(results, spd_run, source)
    if spd_run_of(export.model_path) is None:
        warn(f"spd-cluster export: warning: the run configs' model_path will be {export.model_path!r}, not a wandb "
             f"run ({_no_run(results.config, source)}); the original's scripts will refuse this folder (its "
             "ClusteringRunConfig: \"model_path must start with 'wandb:'\", so get_cluster_mapping fails too); pass "
             "--spd-run wandb:<entity>/<project>/<run> to name the SPD run")
    sizes = original_folder_bytes(export.histories)
    announce(f"spd-cluster export: writing every partition of {len(export.histories)} members in the original's "
             f"format under {out}: run histories {sizes['runs'] / 1e6:,.1f} MB, ensemble array "
             f"{sizes['ensemble'] / 1e6:,.1f} MB before compression")
    return write_original_ensemble(export, out)


def ensemble_export(results, spd_run: str | None, source):
    """The `EnsembleExport` of loaded `ClusteringResults` (`source`: its activation source, None where it cannot be
    made here); `spd_run` replaces the source's model as model_path."""
    from spd_assets.defs.steps import ensemble_export as export_of

    config = results.config
    model_path = None
    if spd_run is not None:
        entity, project, run = _checked_run(spd_run).split("/")
        model_path = f"wandb:{entity}/{project}/runs/{run}"
    return export_of(config, list(results.ensemble.members), results.histories, results.distances, source,
                     model_path=model_path)


def export_spd_app(experiment: str, out: Path, *, member: str | None = None, iteration: int | None = None,
                   spd_run: str | None = None, notes: str | None = None, home: Path | None = None):
    """Write the SPD app's cluster mapping of the experiment's consensus (default) or of one member at `iteration`."""
    from spd_assets.defs.steps import export_ids
    from spd_assets.results import ClusteringResults
    from spd_assets.storage import original_export as original

    results = ClusteringResults.load(experiment, home=home)
    config = results.config
    source = _source_of(config)
    run = _spd_run(config, spd_run, source)
    if member is None:
        consensus = results.consensus
        mapping = original.consensus_mapping_file(
            experiment=config.name, config_hash=config.config_hash, spd_run=run, iteration=consensus.iteration,
            rule=consensus.rule, threshold=consensus.threshold, n_members=len(consensus.members),
            labels=consensus.labels, cluster_of=consensus.cluster_of, notes=notes,
            ensemble_id=export_ids(config, list(consensus.members), source)[0])
    else:
        members = list(results.ensemble.members)
        if member not in members:
            raise ExportError(f"--member: {member!r} is not a member of the ensemble of {experiment!r}; "
                              f"expected one of {members}")
        row, labels = original.original_member_row([results.histories[m] for m in members], members.index(member),
                                                   iteration)
        mapping = original.cluster_mapping_file(
            ensemble_id=export_ids(config, members, source)[0], notes=notes or "", spd_run=run,
            n_iterations=iteration, run_idx=members.index(member), clusters=original.row_clusters(row, labels))
    return original.write_json(out, mapping), mapping


def _spd_run(config, spd_run: str | None, source) -> str:
    from spd_assets.defs.steps import source_model_path
    from spd_assets.storage.original_export import spd_run_of

    if spd_run is not None:
        return _checked_run(spd_run)
    found = spd_run_of(source_model_path(config, source))
    if found is None:
        raise ExportError(f"{_no_run(config, source)}. The SPD app loads a mapping only for the run it has loaded "
                          "(the mapping's spd_run), so pass that run: --spd-run ENTITY/PROJECT/RUN "
                          "(e.g. goodfire/spd/0d2lld8j)")
    return found


def _no_run(config, source) -> str:
    """'experiment X names no wandb SPD run: <why>' (its source, or its source's model path; `source` None where
    it cannot be made here)."""
    from spd_assets.defs.steps import source_model_path
    from spd_assets.storage.original_export import no_spd_run_reason

    reason = no_spd_run_reason(config.source.kind, source_model_path(config, source))
    return f"experiment {config.name!r} names no wandb SPD run: {reason}"


def _source_of(config):
    """The experiment's activation source, or None where it cannot be made here (e.g. spd not installed)."""
    from spd_assets.sources import source_for

    try:
        return source_for(config.source)
    except (SpdClusterError, OSError):
        return None


def _checked_run(spd_run: str) -> str:
    from spd_assets.storage.original_export import spd_run_of

    found = spd_run_of(spd_run)
    if found is None:
        raise ExportError(f"--spd-run: expected ENTITY/PROJECT/RUN (e.g. goodfire/spd/0d2lld8j), got {spd_run!r}")
    return found
