"""What every activation source is: a validated config, its ensemble members, and one batch per member.

A source turns an experiment's `source:` block into causal importances: `member_keys()` are the
ensemble members (Dagster partition keys), `load_batch(member, seed)` the mapping module name ->
tensor of one member (docs/math.md §1). What a source can do beyond that is said by its
capabilities (`has_planted_truth`, ...), never by testing its kind.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

# Dagster partition keys cannot contain these characters.
PARTITION_KEY_FORBIDDEN = frozenset("|,[]")


class SourceConfig(BaseModel):
    """The `source:` block of an experiment config; each source kind subclasses it with `kind: Literal[...]`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    n_members: int | None = None

    def resolved(self, base: Path) -> SourceConfig:
        """This config with every relative path field made relative to `base` (the config file's folder)."""
        update = {
            name: (base / value).resolve()
            for name, value in self
            if isinstance(value, Path) and not value.is_absolute()
        }
        return self.model_copy(update=update) if update else self


ConfigT = TypeVar("ConfigT", bound=SourceConfig)


class ActivationSource(ABC, Generic[ConfigT]):
    """Causal importances of every ensemble member of one experiment.

    Subclasses set `kind` and `config_type` and implement `member_keys` and `load_batch`.
    """

    kind: ClassVar[str]
    config_type: ClassVar[type[SourceConfig]]
    #: `planted_partition(labels)` gives the true grouping (synthetic data), checked after each merge.
    has_planted_truth: ClassVar[bool] = False

    def __init__(self, config: ConfigT) -> None:
        if not isinstance(config, self.config_type):
            raise TypeError(f"{type(self).__name__}: expected a {self.config_type.__name__}, got {type(config).__name__}")
        self.config = config

    @abstractmethod
    def member_keys(self) -> list[str]:
        """The ensemble members, as Dagster partition keys, in ensemble order."""

    @abstractmethod
    def load_batch(self, member: str, seed: int) -> Mapping[str, torch.Tensor]:
        """Module name -> causal importances `[batch, seq, C]` or `[samples, C]` of one member."""

    def planted_partition(self, labels: list[str]) -> np.ndarray:
        """The known group of each label (only where `has_planted_truth`)."""
        raise NotImplementedError(f"the {self.kind} source has no planted truth")

    def describe(self) -> dict[str, Any]:
        """What the source is, for logs and metadata."""
        return self.config.model_dump(mode="json")


def numbered_members(n_members: int) -> list[str]:
    """`member_000`, `member_001`, ... (at least three digits, so keys sort in ensemble order)."""
    width = max(3, len(str(n_members - 1)))
    return [f"member_{index:0{width}d}" for index in range(n_members)]
