"""`extract_and_process_activations` on real SPD runs with the real `spd` package (where `../shared/spd_real`
exists): the same processed activations as the `spd` source's pipeline step for the same batch.

The environment with spd and the small real runs come from the fixtures of `test_spd_source_real.py`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.sources.test_spd_source_real import (  # noqa: F401  (fixtures)
    SPD_REAL,
    SUBPROCESS_TIMEOUT_S,
    _environment,
    real_runs,
    spd_python,
)

pytestmark = pytest.mark.skipif(not SPD_REAL.is_dir(), reason=f"the real spd package is not available ({SPD_REAL})")


def test_equals_the_spd_sources_step_on_the_same_batch(spd_python, real_runs, tmp_path):  # noqa: F811
    process = subprocess.run(
        [str(spd_python), str(Path(__file__).with_name("spd_real_api_checks.py")), str(real_runs["resid_mlp"]),
         str(real_runs["lm"]), str(real_runs["lm_ids"])],
        capture_output=True, text=True, env=_environment(tmp_path / "spd_out"), timeout=SUBPROCESS_TIMEOUT_S)
    assert process.returncode == 0, process.stderr[-4000:]
    found = json.loads(process.stdout.strip().splitlines()[-1])
    assert all(case["equal"] and case["is_component_model"] for case in found.values()), found
    assert found["resid_mlp_compact"]["compact"] and not found["resid_mlp_continuous"]["compact"]
    assert found["resid_mlp_compact"]["samples"] == 32 and found["resid_mlp_compact"]["components"] == 128
    assert found["lm_concat"]["samples"] == 16 * 8 and found["lm_seq_mean"]["samples"] == 16
