"""Round trips with the original's real code (where `../shared/spd_real` exists): its scripts and readers on what
we export, and the `histories` source on what its HEAD and September 2025 code write.

The environment with spd at HEAD is the one `test_spd_source_real.py` builds (cached). The
September 2025 source is extracted beside it once (its PEP 695 lines rewritten for Python 3.11,
as `build.sh` does for HEAD) and put first on `PYTHONPATH`, so the same environment runs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

from spd_assets.cli.main import main as spd_cluster
from spd_assets.notebook import cluster_analysis_pipeline
from spd_assets.sources import HistoriesSource, HistoriesSourceConfig
from spd_assets.storage.original_export import ensemble_id_for
from spd_assets.storage.original_histories import CURRENT, SEPTEMBER_2025
from spd_math import process_activations
from tests.sources import test_spd_source_real as spd_real
from tests.sources.test_spd_source_real import CACHE, PROJECT_ROOT, SPD_REAL, SUBPROCESS_TIMEOUT_S, _environment

spd_python = spd_real.spd_python  # the cached environment with spd at HEAD (a session fixture)

pytestmark = pytest.mark.skipif(not SPD_REAL.is_dir(), reason=f"the real spd package is not available ({SPD_REAL})")

CHECKS = Path(__file__).with_name("interop_real_checks.py")
SEPTEMBER = CACHE / "september-2025"
HEAD_WITH_APP = CACHE / "head-with-app"
PEP_695 = re.compile(r"^(?P<indent>\s*)(?P<kind>def|class) (?P<name>\w+)\[")
# Bump when the rewrite or the packages change, so that the cached set-up is made again.
SETUP_VERSION = "4"
# What its clustering code imports beyond the HEAD environment (its wandb tensor logging uses plotly).
SEPTEMBER_PACKAGES = ["muutils", "plotly"]
APP_PACKAGES = ["fastapi", "fire"]  # the app backend; get_cluster_mapping's command line


def _split_parameters(text: str) -> list[str]:
    """Top-level comma-separated parts of `text` (commas inside brackets belong to their part)."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[(" and 1 or (char in "])" and -1 or 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [part.strip() for part in [*parts, current] if part.strip()]


def _rewrite_pep_695(source: str) -> str:
    """`def f[T: Bound, **P](...)` -> `def f(...)` with module-level TypeVars / ParamSpecs above its decorators;
    `class C[T](Base)` -> `class C(Base, Generic[T])`. Syntax only."""
    output: list[str] = []
    for line in source.split("\n"):
        match = PEP_695.match(line)
        if not match:
            output.append(line)
            continue
        depth, end = 1, match.end()
        while depth:
            depth += {"[": 1, "]": -1}.get(line[end], 0)
            end += 1
        names = [p.split(":")[0].strip() for p in _split_parameters(line[match.end():end - 1])]
        declarations = [f'{n[2:]} = __import__("typing").ParamSpec("{n[2:]}")' if n.startswith("**")
                        else f'{n.lstrip("*")} = __import__("typing").TypeVar("{n.lstrip("*")}")' for n in names]
        at = len(output)
        while at > 0 and output[at - 1].lstrip().startswith("@"):
            at -= 1
        output[at:at] = [match["indent"] + d for d in declarations]
        rest = line[end:]
        if match["kind"] == "class":
            generic = "__import__('typing').Generic[" + ", ".join(n.lstrip("*") for n in names) + "]"
            rest = f"({rest[1:-2]}, {generic}):" if rest.startswith("(") else f"({generic}):"
        output.append(f"{match['indent']}{match['kind']} {match['name']}{rest}")
    return "\n".join(output)


@pytest.fixture(scope="session")
def september_path(spd_python) -> Path:
    """The September 2025 source, runnable on 3.11 in the cached environment (with the packages it imports)."""
    with FileLock(str(CACHE.parent / "spd-september.lock")):
        marker = SEPTEMBER / f".ready-{SETUP_VERSION}"
        if not marker.exists():
            shutil.rmtree(SEPTEMBER, ignore_errors=True)
            _extract_for_py311(SPD_REAL / "spd-src-2025-09.tar.gz", SEPTEMBER)
            installed = subprocess.run([str(spd_python), "-m", "pip", "install", "-q", *SEPTEMBER_PACKAGES], capture_output=True,
                                       text=True, timeout=SUBPROCESS_TIMEOUT_S)
            assert installed.returncode == 0, installed.stderr[-3000:]
            marker.write_text("ok")
    return SEPTEMBER


@pytest.fixture(scope="session")
def app_path(spd_python) -> Path:
    """The HEAD source with every PEP 695 line rewritten (build.sh rewrites those the package's import needs; the
    app's backend has more), to put first on PYTHONPATH, and what the backend imports besides spd's pinned
    requirements (FastAPI; fire for get_cluster_mapping) in the cached environment."""
    with FileLock(str(CACHE.parent / "spd-app.lock")):
        marker = HEAD_WITH_APP / f".ready-{SETUP_VERSION}"
        if not marker.exists():
            shutil.rmtree(HEAD_WITH_APP, ignore_errors=True)
            _extract_for_py311(SPD_REAL / "spd-src.tar.gz", HEAD_WITH_APP)
            installed = subprocess.run([str(spd_python), "-m", "pip", "install", "-q", *APP_PACKAGES], capture_output=True,
                                       text=True, timeout=SUBPROCESS_TIMEOUT_S)
            assert installed.returncode == 0, installed.stderr[-3000:]
            marker.write_text("ok")
    return HEAD_WITH_APP


def _extract_for_py311(tarball: Path, folder: Path) -> None:
    with tarfile.open(tarball) as archive:
        archive.extractall(folder, filter="data")
    for path in (folder / "spd").rglob("*.py"):
        text = path.read_text()
        if re.search(r"^\s*(def|class) \w+\[", text, re.M):
            path.write_text(_rewrite_pep_695(text))


def _run(python: Path, *arguments: str, spd_out: Path, pythonpath: str | None = None) -> dict:
    environment = _environment(spd_out)
    if pythonpath is not None:
        environment["PYTHONPATH"] = pythonpath
    process = subprocess.run([str(python), str(CHECKS), *arguments], capture_output=True, text=True,
                             env=environment, timeout=SUBPROCESS_TIMEOUT_S)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


def _activations(path: Path) -> Path:
    """Three members' processed activations with different dead components (so labels differ between members)."""
    arrays = {}
    for member in range(3):
        generator = torch.Generator().manual_seed(member)
        batch = {name: torch.rand(96, 10, generator=generator) ** 3 for name in ("layers.0.mlp_in", "layers.0.mlp_out")}
        batch["layers.0.mlp_in"][:, member] = 0.0  # dead in this member only
        processed = process_activations(batch, filter_dead_threshold=0.001, seq_mode=None)
        arrays[f"m{member}/activations"] = processed.activations.numpy()
        arrays[f"m{member}/labels"] = np.array(processed.labels)
    np.savez(path, **arrays)
    return path


def test_histories_of_the_originals_head_and_september_code_read_to_their_own_partitions(spd_python, september_path, tmp_path):
    activations = _activations(tmp_path / "activations.npz")
    head = _run(spd_python, "make-histories", str(tmp_path / "head"), str(activations), spd_out=tmp_path / "out")
    september = _run(spd_python, "make-histories", str(tmp_path / "september"), str(activations), spd_out=tmp_path / "out",
                     pythonpath=f"{september_path}{os.pathsep}{PROJECT_ROOT}")
    assert not head["september"] and september["september"]  # each version's own code ran

    for folder, kind in ((tmp_path / "head", CURRENT), (tmp_path / "september", SEPTEMBER_2025)):
        source = HistoriesSource(HistoriesSourceConfig(directory=folder))
        assert source.member_keys() == ["m0", "m1", "m2"]
        for member in source.member_keys():
            found = source.load_history(member)
            assert found.format == kind
            expected = np.load(folder / member / "after_each_merge.npy")
            assert np.array_equal(found.history.group_idxs.numpy(), expected), (kind, member)
            assert found.history.k_groups.tolist() == [found.history.c_components - 1 - i for i in range(15)]
    # the same merges, written in the two formats, read to the same histories
    for member in ("m0", "m1", "m2"):
        a = HistoriesSource(HistoriesSourceConfig(directory=tmp_path / "head")).load_history(member).history
        b = HistoriesSource(HistoriesSourceConfig(directory=tmp_path / "september")).load_history(member).history
        assert a.labels == b.labels and torch.equal(a.group_idxs, b.group_idxs) and torch.equal(a.selected_pairs, b.selected_pairs)

    # and through the whole graph: the ensemble of the September files
    results = cluster_analysis_pipeline({"name": "september_runs", "consensus": {"k": 10},
                                         "source": {"kind": "histories", "directory": str(tmp_path / "september")}},
                                        home=tmp_path / "home")
    assert results.ensemble.members == ["m0", "m1", "m2"] and results.ensemble.missing == []
    assert np.array_equal(results.histories["m1"].group_idxs.numpy(), np.load(tmp_path / "september" / "m1" / "after_each_merge.npy"))


def test_the_originals_code_reads_our_export_and_agrees(spd_python, app_path, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    batches = tmp_path / "batches"
    batches.mkdir()
    for member in range(3):  # each member has a dead component of its own: the members' labels differ
        generator = torch.Generator().manual_seed(member)
        batch = {name: torch.rand(96, 10, generator=generator).numpy() ** 3 for name in ("layers.0.mlp_in", "layers.0.mlp_out")}
        batch["layers.0.mlp_in"][:, member] = 0.0
        np.savez(batches / f"b{member}.npz", **batch)
    results = cluster_analysis_pipeline(
        {"name": "exported", "merge_config": {"iters": 15, "activation_threshold": 0.1}, "seq_mode": None,
         "source": {"kind": "files", "directory": str(batches)}}, home=home)
    out = tmp_path / "spd_out"
    assert spd_cluster(["export", "original", "--experiment", "exported", "--out", str(out),
                        "--spd-run", "goodfire/spd/abcd1234"]) == 0
    mapping = tmp_path / "mapping.json"
    assert spd_cluster(["export", "spd-app", "--experiment", "exported", "--out", str(mapping), "--member", "b1",
                        "--iteration", "9", "--spd-run", "goodfire/spd/abcd1234"]) == 0
    consensus = tmp_path / "consensus.json"
    assert spd_cluster(["export", "spd-app", "--experiment", "exported", "--out", str(consensus),
                        "--spd-run", "goodfire/spd/abcd1234"]) == 0
    ensemble_id = ensemble_id_for("exported", results.config.config_hash)

    found = _run(spd_python, "check-export", str(out), ensemble_id, str(mapping), str(consensus), spd_out=out,
                 pythonpath=f"{app_path}{os.pathsep}{PROJECT_ROOT}")
    assert found["runs"] and found["histories_equal"]
    array = found["array"]
    assert array["shape_equal"] and array["dtype"] == ["int16", "int16"], array
    assert array["exact_where_present"] and array["same_ids_where_missing"], array
    assert found["meta_equal"], found["meta_keys"]
    for method, finding in found["distances"].items():
        assert finding["equal"] and finding["nan_where_theirs"], (method, finding)
    assert found["distances"]["perm_invariant_hamming"]["dtype"] == ["float64", "float64"]
    assert found["distances"]["matching_dist"]["dtype"] == ["float32", "float32"]
    assert found["script_array_same_partitions"]["exact_where_present"]
    assert all(found["script_distances_equal"].values())
    assert found["mapping_equal"], found["mapping_differences"]
    assert found["validated"] == {"member": "valid", "consensus": "valid"}
    assert array["missing_labels"] == 3  # each member lacks its own dead component, which the others have
    print("round trip findings:", json.dumps(found))
