"""Results stored by the previous layout, read as they are.

The previous layout kept every partition: each member's merge history in the original research
format (`merge_history/<member>.zip`, `[iters, c]` ids) and the normalized ensemble as one
`[members, iters, c]` array (`normalized_ensemble.npz` with `merges`). Both are still read
(`values.load_history`, `values.load_ensemble`); a value written now replaces its file.

Dagster recorded their data versions as that layout's values fingerprinted, so checking such a
file against its record (`spd-cluster doctor`) fingerprints it the way that layout did:
`previous_fingerprint`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spd_assets.storage import values
from spd_assets.storage.lineage import fingerprint
from spd_math import MergeConfig
from spd_math import MergeHistory as CurrentMergeHistory


# Named as that layout's value classes, with their fields in their order: the fingerprint hashes both.
@dataclass(frozen=True)
class MergeHistory:
    labels: list[str]
    group_idxs: torch.Tensor
    selected_pairs: torch.Tensor | None
    k_groups: torch.Tensor
    pair_costs: torch.Tensor | None
    mdl_losses: torch.Tensor | None
    config: MergeConfig | None
    seed: int | None


@dataclass(frozen=True)
class NormalizedEnsemble:
    merges: torch.Tensor
    labels: list[str]
    present: torch.Tensor


@dataclass(frozen=True)
class MemberEnsemble:
    ensemble: NormalizedEnsemble
    members: list[str]
    missing: list[str]


def is_previous_layout(path: Path) -> bool:
    """Whether the value file at `path` is in the previous layout."""
    if path.suffix == values.HISTORY_ZIP_SUFFIX:
        return True
    if path.name.startswith("normalized_ensemble") and path.suffix == ".npz" and path.exists():
        try:
            with np.load(path, allow_pickle=False) as data:
                return "merges" in data.files
        except (OSError, ValueError):
            return False
    return False


def previous_fingerprint(value: Any) -> str:
    """The data version the previous layout recorded for `value` (read from a file of that layout)."""
    if isinstance(value, CurrentMergeHistory):
        return fingerprint(MergeHistory(value.labels, value.group_idxs, value.selected_pairs, value.k_groups,
                                        value.pair_costs, value.mdl_losses, value.config, value.seed))
    if isinstance(value, values.MemberEnsemble):
        ensemble = value.ensemble
        return fingerprint(MemberEnsemble(NormalizedEnsemble(ensemble.merges, ensemble.labels, ensemble.present),
                                          value.members, value.missing))
    return fingerprint(value)
