"""SQL over results and lineage, the README's example queries, and the sql and clusters commands,
all against real `spd-cluster run`s in a temporary DAGSTER_HOME: the embedded default, an alpha sweep, and an
experiment that differs from the default in more than alpha (so a query that mixes experiments shows it)."""

from __future__ import annotations

import csv as csv_module
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from dagster import AssetKey, AssetRecordsFilter

from spd_assets.config import load_config
from spd_assets.sources import source_for
from spd_assets.storage.database import connect_read_only
from spd_assets.storage.values import load_consensus, load_distances, load_ensemble, load_history
from spd_math.consensus import consensus_clusters, partition_clusters
from tests.pipeline_helpers import asset_path, instance_at, make_home, store_at

README = Path(__file__).resolve().parents[2] / "README.md"
ALPHA_SWEEP = ["--set", "name=alpha_half", "--set", "merge_config.alpha=0.5"]
# Alpha as in the sweep, and fewer members: not part of the sweep, and its members' rows differ from the default's.
OTHER = ["--set", "name=two_members", "--set", "merge_config.alpha=0.5", "--set", "source.n_members=2"]
EXPERIMENTS = ["alpha_half", "default", "two_members"]
VALUE_ASSETS = ("('component_activations', 'merge_history', 'normalized_ensemble', 'distance_matrices', "
                "'consensus_clusters', 'cluster_explorer')")


def cli(home: Path, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "spd_assets.cli", *args], env={**os.environ, "DAGSTER_HOME": str(home)},
                            input=stdin, capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    home = make_home(tmp_path_factory.mktemp("results") / "home")
    cli(home, "run")
    cli(home, "run", *ALPHA_SWEEP)
    cli(home, "run", *OTHER)
    return home


def readme_section() -> str:
    return README.read_text().split("## Querying results", 1)[1].split("\n## ", 1)[0]


def readme_queries() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", readme_section(), flags=re.DOTALL)


def readme_commands() -> list[str]:
    """The section's command lines that run `spd-cluster sql` (indented code)."""
    return [line.strip() for line in readme_section().splitlines() if line.startswith("    ") and "spd-cluster sql" in line]


def sql_answer(home: Path, statement: str, tmp_path: Path) -> pl.DataFrame:
    """The answer of `spd-cluster sql`, through a Parquet file it writes (exact types)."""
    output = tmp_path / "answer.parquet"
    cli(home, "sql", statement, "--format", "parquet", "--output", str(output))
    return pl.read_parquet(output)


def members_of(home: Path, experiment: str) -> list[str]:
    return load_ensemble(asset_path(experiment, "normalized_ensemble", None, home)).members


def mdl_minima(home: Path, experiment: str) -> dict[str, tuple[int, float]]:
    """Per member of `experiment`: (k groups at the MDL loss minimum, the minimum), from its merge history file."""
    minima = {}
    for member in members_of(home, experiment):
        history = load_history(asset_path(experiment, "merge_history", member, home))
        losses = np.asarray(history.mdl_losses, dtype=np.float64)
        best = int(np.argmin(losses))
        minima[member] = (int(np.asarray(history.k_groups)[best]), float(losses[best]))
    return minima


def query(home: Path, sql: str, parameters: list | None = None) -> pl.DataFrame:
    with connect_read_only(store_at(home)) as connection:
        relation = connection.execute(sql, parameters or [])
        columns = [description[0] for description in relation.description]
        return pl.DataFrame(relation.fetchall(), schema=columns, orient="row")


def test_readme_has_the_example_queries():
    assert len(readme_queries()) == 4


def test_readme_same_cluster_in_every_member_finds_the_planted_group(home):
    answer = query(home, readme_queries()[0])
    model = source_for(load_config(None).source).model
    group = model.planted_group[model.labels.index("layers.1.mlp.up:10")]
    planted = {label for label, g in zip(model.labels, model.planted_group) if g == group} - {"layers.1.mlp.up:10"}
    assert set(answer["label"]) == planted


def test_readme_lineage_query_names_every_member_history_that_fed_the_distances(home):
    answer = query(home, readme_queries()[1])
    members = source_for(load_config(None).source).member_keys()
    assert answer["member"].to_list() == members
    assert answer["config_hash"].to_list() == [load_config(None).config_hash] * len(members)
    assert answer["code_version"].null_count() == 0 and answer["run_id"].null_count() == 0
    with instance_at(home) as instance:
        for member, version in zip(answer["member"], answer["history_version"]):
            records = instance.fetch_materializations(
                AssetRecordsFilter(asset_key=AssetKey(["default", "merge_history"]), asset_partitions=[member]), limit=1
            ).records
            recorded = records[0].asset_materialization.tags["dagster/data_version"]
            assert recorded == version, "DuckDB and Dagster disagree on the data version"


def test_readme_alpha_comparison_compares_only_the_sweep(home, tmp_path):
    answer = sql_answer(home, readme_queries()[2], tmp_path)
    # two_members has the sweep's alpha but fewer members: it is not part of the comparison.
    assert set(answer["experiment"]) == {"default", "alpha_half"}
    assert set(answer["alpha"]) == {0.5, 1.0}
    assert answer.height == 2 * 2 * 3  # alphas x methods x iterations
    for experiment in ("default", "alpha_half"):
        stored = load_distances(asset_path(experiment, "distance_matrices", None, home))
        rows = answer.filter(pl.col("experiment") == experiment)
        for method, iteration, mean in zip(rows["method"], rows["iteration"], rows["mean_distance"]):
            matrix = stored.by_method[method][iteration].numpy()
            off_diagonal = matrix[~np.eye(len(matrix), dtype=bool)]
            assert mean == pytest.approx(round(float(off_diagonal.mean()), 1), abs=0.051)


def test_readme_mdl_minimum_query_answers_per_experiment(home, tmp_path):
    answer = sql_answer(home, readme_queries()[3], tmp_path)
    assert sorted(set(answer["experiment"])) == EXPERIMENTS
    for experiment in EXPERIMENTS:
        rows = answer.filter(pl.col("experiment") == experiment)
        minima = mdl_minima(home, experiment)
        assert rows["member"].to_list() == sorted(minima)
        for member, k_at_min, min_mdl in zip(rows["member"], rows["k_at_min"], rows["min_mdl"]):
            assert (k_at_min, min_mdl) == (minima[member][0], pytest.approx(round(minima[member][1]), abs=1))
        assert rows["k_at_min"].min() > 3


def test_every_readme_command_runs_as_written_and_answers_for_its_experiment(home, tmp_path):
    commands = readme_commands()
    assert len(commands) == 4
    # What the commands name: a query file (the MDL query) and a file of one's own to join (--allow-read).
    (tmp_path / "query.sql").write_text(readme_queries()[3])
    (tmp_path / "labels.csv").write_text("member,note\nmember_000,first\nmember_001,second\n")
    environment = {**os.environ, "DAGSTER_HOME": str(home),
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    outputs = {}
    for command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=environment, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"{command}\n{result.stdout}{result.stderr}"
        outputs[command] = result

    best, settings, to_file, joined = commands
    # The first: the default's members alone, each with its own minimum.
    answer = sql_answer(home, shlex.split(best)[2], tmp_path)
    minima = mdl_minima(home, "default")
    assert answer["member"].to_list() == sorted(minima)
    assert answer["best_mdl"].to_list() == pytest.approx([minima[m][1] for m in sorted(minima)], rel=1e-6)
    assert answer["k_at_best"].to_list() == [minima[m][0] for m in sorted(minima)]
    assert "member_000" in outputs[best].stdout
    # experiment_settings: one row per experiment, with its own settings.
    rows = list(csv_module.DictReader(outputs[settings].stdout.splitlines()))
    assert {row["experiment"]: (float(row["alpha"]), int(row["n_members"])) for row in rows} == {
        "default": (1.0, 6), "alpha_half": (0.5, 6), "two_members": (0.5, 2)}
    # The query file's answer, written by spd-cluster.
    written = pl.read_parquet(tmp_path / "result.parquet")
    assert written.equals(sql_answer(home, readme_queries()[3], tmp_path))
    # A file of one's own, opened with --allow-read, joined to the default's rows only.
    assert f"--allow-read: the query may also read {tmp_path / 'labels.csv'}" in outputs[joined].stderr
    exact = subprocess.run(["bash", "-c", f"{joined} --format parquet --output joined.parquet"], cwd=tmp_path,
                           env=environment, capture_output=True, text=True, timeout=300)
    assert exact.returncode == 0, exact.stderr
    answer = pl.read_parquet(tmp_path / "joined.parquet")
    assert set(answer["experiment"]) == {"default"}
    assert dict(answer.select("member", "note").unique().iter_rows()) == {"member_000": "first", "member_001": "second"}
    events = sql_answer(home, "SELECT count(*) AS n FROM merge_events WHERE experiment = 'default' "
                              "AND member IN ('member_000', 'member_001')", tmp_path)
    assert answer.height == events["n"][0]


def test_every_partition_has_a_materialization_and_edges_connect_the_graph(home):
    members = source_for(load_config(None).source).member_keys()
    latest = query(home, "SELECT asset, partition, data_version, run_id FROM latest_materializations "
                         f"WHERE experiment = 'default' AND asset IN {VALUE_ASSETS}")
    version = {(row["asset"], row["partition"]): row["data_version"] for row in latest.iter_rows(named=True)}
    assert set(version) == {(asset, m) for asset in ("component_activations", "merge_history") for m in members} | {
        ("normalized_ensemble", None), ("distance_matrices", None), ("consensus_clusters", None),
        ("cluster_explorer", None)}
    edges = query(home, "SELECT * FROM lineage_edges WHERE experiment = 'default'")
    consumed = {(r["asset"], r["partition"], r["upstream_asset"], r["upstream_partition"]): r["upstream_data_version"]
                for r in edges.iter_rows(named=True)}
    assert consumed[("distance_matrices", None, "normalized_ensemble", None)] == version[("normalized_ensemble", None)]
    assert consumed[("consensus_clusters", None, "distance_matrices", None)] == version[("distance_matrices", None)]
    assert consumed[("cluster_explorer", None, "consensus_clusters", None)] == version[("consensus_clusters", None)]
    for member in members:
        assert consumed[("normalized_ensemble", None, "merge_history", member)] == version[("merge_history", member)]
        assert consumed[("consensus_clusters", None, "merge_history", member)] == version[("merge_history", member)]
        assert consumed[("merge_history", member, "component_activations", member)] == version[("component_activations", member)]
        assert ("component_activations", member, "source:synthetic", member) in consumed


@pytest.mark.slow  # re-runs of a member: also tests/cli/test_reruns_and_doctor.py
def test_rerunning_a_partition_and_the_ensemble_keeps_history(home):
    values = f"experiment = 'alpha_half' AND asset IN {VALUE_ASSETS}"
    before = query(home, f"SELECT asset, partition, run_id FROM materializations WHERE {values}")
    cli(home, "run", *ALPHA_SWEEP, "--members", "member_002")
    latest = query(home, f"SELECT asset, partition, run_id FROM latest_materializations WHERE {values}")
    old_runs = set(before["run_id"])
    rerun = latest.filter((pl.col("partition") == "member_002") | pl.col("partition").is_null())
    assert rerun.height == 6 and not (set(rerun["run_id"]) & old_runs), "latest rows must be the new runs"
    untouched = latest.filter(pl.col("partition").is_not_null() & (pl.col("partition") != "member_002"))
    assert set(untouched["run_id"]) <= old_runs
    after = query(home, f"SELECT count(*) AS n FROM materializations WHERE {values}")["n"][0]
    assert after == before.height + 6
    # Result tables replace the partition's rows: no duplicates.
    counts = query(home, "SELECT member, count(*) AS n FROM merge_events WHERE experiment = 'alpha_half' GROUP BY member")
    assert counts["n"].n_unique() == 1


def test_sql_command_formats_and_errors(home, tmp_path):
    statement = "SELECT experiment, count(*) AS n FROM merge_events GROUP BY experiment ORDER BY experiment"
    table = cli(home, "sql", statement).stdout
    assert "alpha_half" in table and "│" in table
    csv = cli(home, "sql", "--format", "csv", stdin=statement).stdout
    assert csv.splitlines()[0] == "experiment,n" and len(csv.splitlines()) == 1 + len(EXPERIMENTS)
    records = json.loads(cli(home, "sql", statement, "--format", "json").stdout)
    assert [r["experiment"] for r in records] == EXPERIMENTS
    query_file = tmp_path / "query.sql"
    query_file.write_text(statement)
    cli(home, "sql", "--file", str(query_file), "--format", "parquet", "--output", str(tmp_path / "out.parquet"))
    assert pl.read_parquet(tmp_path / "out.parquet")["n"].to_list() == [int(r["n"]) for r in records]

    bad = cli(home, "sql", "SELECT * FROM no_such_table", check=False)
    assert bad.returncode == 1 and "no_such_table" in bad.stderr and "Traceback" not in bad.stderr
    writing = cli(home, "sql", "DROP VIEW distances", check=False)
    assert writing.returncode == 1 and "refused `DROP VIEW distances`" in writing.stderr and "Traceback" not in writing.stderr
    assert cli(home, "sql", "SELECT count(*) FROM distances").returncode == 0


@pytest.mark.slow  # queries during a run: also tests/cli/test_cli.py
def test_sql_command_while_a_pipeline_runs(home):
    environment = {**os.environ, "DAGSTER_HOME": str(home)}
    run = subprocess.Popen([sys.executable, "-m", "spd_assets.cli", "run", "--set", "name=during", "--set", "source.n_members=2"],
                           env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    answers = []
    while run.poll() is None:
        answers.append(cli(home, "sql", "SELECT count(*) AS n FROM merge_events WHERE experiment = 'during'", "--format", "csv").stdout)
        time.sleep(0.5)
    stdout, stderr = run.communicate()
    assert run.returncode == 0, stdout + stderr
    assert answers, "the run ended before any query"
    final = cli(home, "sql", "SELECT count(*) AS n FROM merge_events WHERE experiment = 'during'", "--format", "csv").stdout
    assert int(final.splitlines()[1]) > 0


def test_clusters_of_a_member_come_from_the_tables_and_equal_the_history(home):
    member = json.loads(cli(home, "clusters", "--iteration", "300", "--member", "member_001").stdout)
    assert member["experiment"] == "default" and member["iteration"] == 300 and member["member"] == "member_001"
    history = load_history(asset_path("default", "merge_history", "member_001", home))
    expected = partition_clusters(history.group_idxs[300])
    assert member["clusters"] == {label: int(c) if c >= 0 else None for label, c in zip(history.labels, expected.cluster_of)}
    assert member["k_groups"] == int(history.k_groups[300]) and member["n_clusters"] == expected.stability.size

    missing = cli(home, "clusters", "--iteration", "300", "--member", "member_999", check=False)
    assert missing.returncode == 1 and "member_000" in missing.stderr
    beyond = cli(home, "clusters", "--iteration", "100000", "--member", "member_000", check=False)
    assert beyond.returncode == 1 and "--iteration: expected 0.." in beyond.stderr and "Traceback" not in beyond.stderr


def test_consensus_is_read_from_the_stored_result(home):
    stored = load_consensus(asset_path("default", "consensus_clusters", None, home))
    consensus = json.loads(cli(home, "clusters", "--consensus").stdout)
    assert consensus["stored"] and consensus["iteration"] == stored.iteration and consensus["rule"] == stored.rule
    assert consensus["members"] == stored.members and consensus["member"] is None
    assert consensus["clusters"] == {label: int(c) if c >= 0 else None for label, c in zip(stored.labels, stored.cluster_of)}
    assert [consensus["stability"][str(i)] for i in range(stored.n_clusters)] == pytest.approx(stored.stability.tolist())
    clustered = [label for label, c in zip(stored.labels, stored.cluster_of) if c >= 0]
    assert sorted(consensus["component_stability"]) == sorted(clustered)

    # The rule: the median over members of each member's MDL-loss minimum, which on the default recovers the
    # planted groups almost exactly.
    minima = query(home, "SELECT member, arg_min(iteration, mdl_loss) AS best FROM merge_events "
                         "WHERE experiment = 'default' GROUP BY member ORDER BY member")["best"].to_list()
    assert stored.iteration == sorted(minima)[(len(minima) - 1) // 2]
    with instance_at(home) as instance:
        metadata = instance.get_latest_materialization_event(
            AssetKey(["default", "consensus_clusters"])).asset_materialization.metadata
    assert metadata["planted_truth_adjusted_rand_index"].value > 0.95
    clusters = query(home, "SELECT * FROM consensus_clusters WHERE experiment = 'default' ORDER BY cluster")
    assert clusters.height == stored.n_clusters and clusters["stability"].to_list() == pytest.approx(stored.stability.tolist())


def test_consensus_at_another_iteration_is_computed(home):
    consensus = json.loads(cli(home, "clusters", "--iteration", "300", "--consensus").stdout)
    stored = load_ensemble(asset_path("default", "normalized_ensemble", None, home))
    expected = consensus_clusters(stored.ensemble.merges[:, 300, :])
    assert not consensus["stored"] and consensus["members"] == stored.members
    assert [consensus["clusters"][label] for label in stored.ensemble.labels] == [
        int(c) if c >= 0 else None for c in expected.cluster_of]
    stability = np.array([consensus["stability"][str(i)] for i in range(consensus["n_clusters"])])
    assert ((stability >= 0.5) & (stability <= 1.0)).all()

    # Another threshold alone: at the stored consensus's iteration, chosen by its rule.
    stored_consensus = load_consensus(asset_path("default", "consensus_clusters", None, home))
    stricter = json.loads(cli(home, "clusters", "--consensus", "--threshold", "0.9").stdout)
    expected = consensus_clusters(stored.ensemble.merges[:, stored_consensus.iteration, :], threshold=0.9)
    assert not stricter["stored"] and stricter["threshold"] == 0.9 and stricter["rule"] == stored_consensus.rule
    assert stricter["iteration"] == stored_consensus.iteration
    assert [stricter["clusters"][label] for label in stored.ensemble.labels] == [
        int(c) if c >= 0 else None for c in expected.cluster_of]


@pytest.mark.parametrize("arguments", [["clusters", "--consensus"], ["clusters", "--member", "member_000", "--iteration", "1"],
                                       ["export", "spd-app", "--out", "mapping.json"]])
def test_a_misspelt_experiment_is_named_with_the_close_matches(home, arguments):
    answer = cli(home, *arguments, "--experiment", "defualt", check=False)
    assert answer.returncode != 0 and "Traceback" not in answer.stderr
    assert "no experiment 'defualt'" in answer.stderr and "did you mean 'default'?" in answer.stderr, answer.stderr


QUERY_IMPORTS = r"""
import sys
from spd_assets.cli.main import main
code = main(sys.argv[1:])
heavy = sorted({name.split(".")[0] for name in sys.modules} & {"torch", "dagster", "polars", "spd_math"})
sys.stderr.write("heavy:" + ",".join(heavy) + "\n")
sys.exit(code)
"""


@pytest.mark.parametrize("arguments", [
    ["sql", "SELECT count(*) FROM consensus_clusters"],
    ["clusters", "--consensus"],
    ["clusters", "--member", "member_000", "--iteration", "10"],
], ids=["sql", "consensus", "member"])
def test_queries_import_neither_torch_nor_dagster(home, arguments):
    result = subprocess.run([sys.executable, "-c", QUERY_IMPORTS, *arguments], env={**os.environ, "DAGSTER_HOME": str(home)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "heavy:\n" in result.stderr, result.stderr


def test_results_of_a_cli_run_load_in_a_notebook(home):
    from spd_assets import ClusteringResults

    results = ClusteringResults.load("alpha_half", home=home)
    assert results.config.merge_config.alpha == 0.5 and list(results.histories) == results.ensemble.members
    assert set(results.distances) == set(results.config.distance_methods)
    assert results.tables["merge_events"]["experiment"].unique().to_list() == ["alpha_half"]
    assert results.tables["consensus_clusters"].height == results.consensus.n_clusters
    assert results.explorer_path.exists()
    assert len(repr(results)) < 1000
    with pytest.raises(Exception, match="no experiment 'nothing'"):
        ClusteringResults.load("nothing", home=home)
