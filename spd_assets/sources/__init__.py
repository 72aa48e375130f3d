"""Layer 2, activation sources: where each ensemble member's causal importances come from.

One module per source kind, registered here (kind -> class). A new source is one module with
a `SourceConfig` subclass and an `ActivationSource` subclass, plus one line in `SOURCES`; the
experiment config accepts its `source:` block from then on.
"""

from __future__ import annotations

from spd_assets.sources.base import ActivationSource, RunTimeNeed, SourceConfig, numbered_members
from spd_assets.sources.files import FilesSource, FilesSourceConfig
from spd_assets.sources.histories import HistoriesSource, HistoriesSourceConfig
from spd_assets.sources.model_source import ModelSource
from spd_assets.sources.spd import SpdSource, SpdSourceConfig
from spd_assets.sources.synthetic import SyntheticSource, SyntheticSourceConfig
from spd_assets.sources.torch_model import TorchSource, TorchSourceConfig

SOURCES: dict[str, type[ActivationSource]] = {
    source.kind: source for source in (SyntheticSource, FilesSource, TorchSource, SpdSource, HistoriesSource)
}


def source_for(config: SourceConfig) -> ActivationSource:
    """The source an experiment's `source:` block describes."""
    return SOURCES[config.kind](config)


__all__ = [
    "SOURCES",
    "ActivationSource",
    "FilesSource",
    "FilesSourceConfig",
    "HistoriesSource",
    "HistoriesSourceConfig",
    "ModelSource",
    "RunTimeNeed",
    "SourceConfig",
    "SpdSource",
    "SpdSourceConfig",
    "SyntheticSource",
    "SyntheticSourceConfig",
    "TorchSource",
    "TorchSourceConfig",
    "numbered_members",
    "source_for",
]
