"""What every activation source is: a validated config, its ensemble members, and one batch per member.

A source turns an experiment's `source:` block into causal importances: `member_keys()` are the
ensemble members (Dagster partition keys), `load_batch(member, seed)` the mapping module name ->
tensor of one member (docs/math.md §1), and `check()` fails early on what would fail every member.
What a source can do beyond that is said by its capabilities (`has_planted_truth`,
`has_token_batches`, `needs_device`), never by testing its kind.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import torch

from spd_assets.config.sources import SourceConfig

# Dagster partition keys cannot contain these characters.
PARTITION_KEY_FORBIDDEN = frozenset("|,[]")


@dataclass(frozen=True)
class RunTimeNeed:
    """Something a source needs when it runs (a package, network access), and whether this environment has it."""

    what: str
    available: bool | None  # None: cannot be told without trying (network access)
    detail: str = ""


ConfigT = TypeVar("ConfigT", bound=SourceConfig)


class ActivationSource(ABC, Generic[ConfigT]):
    """Causal importances of every ensemble member of one experiment.

    Subclasses set `kind` and `config_type` and implement `member_keys` and `load_batch`.
    """

    kind: ClassVar[str]
    config_type: ClassVar[type[SourceConfig]]
    #: `planted_partition(labels)` gives the true grouping (synthetic data), checked after each merge.
    has_planted_truth: ClassVar[bool] = False
    #: Each member's model inputs are an asset of their own (`token_batches`), and its activations come from
    #: a forward pass in chunks (see `spd_assets.sources.model_source.ModelSource`).
    has_token_batches: ClassVar[bool] = False
    #: The activations are computed on a device leased from the device pool (a GPU when there is one).
    needs_device: ClassVar[bool] = False
    #: Members are stored merge histories (`load_history(member)`), read instead of computed: no activations, no merge.
    has_histories: ClassVar[bool] = False
    #: A member's batch also comes a few sequences at a time (`batch_chunks`), the same values as `load_batch`, so
    #: that a member with an activation threshold goes into compact form without the whole batch in memory.
    streams_batches: ClassVar[bool] = False

    def __init__(self, config: ConfigT) -> None:
        if not isinstance(config, self.config_type):
            raise TypeError(f"{type(self).__name__}: expected a {self.config_type.__name__}, got {type(config).__name__}")
        self.config = config

    def check(self) -> None:
        """Raise a `SourceError` naming the value at fault and what was expected, for anything that would fail
        every member (a missing directory, a model that does not load, a pattern matching no module).

        Called before any member runs (`spd-cluster run`, `spd-cluster validate`) and at the start of each
        member's first step. The default lists the members.
        """
        self.member_keys()

    def run_time_needs(self) -> list[RunTimeNeed]:
        """What running this source needs beyond spd-cluster's own dependencies (none by default)."""
        return []

    def batch_seed(self, member: str, member_seed: int) -> int:
        """The seed a member's batch is drawn with: the experiment's member seed unless the source says otherwise."""
        return member_seed

    @abstractmethod
    def member_keys(self) -> list[str]:
        """The ensemble members, as Dagster partition keys, in ensemble order."""

    @abstractmethod
    def load_batch(self, member: str, seed: int) -> Mapping[str, torch.Tensor]:
        """Module name -> causal importances `[batch, seq, C]` or `[samples, C]` of one member."""

    def batch_chunks(self, member: str, seed: int) -> Iterator[Mapping[str, torch.Tensor]]:
        """`load_batch(member, seed)` a few sequences at a time: module name -> `[sequences, seq, C]` (only where
        `streams_batches`)."""
        raise NotImplementedError(f"the {self.kind} source gives its batches whole")

    def batch_identity(self, member: str, seed: int) -> Any:
        """What a streamed batch is a function of (it is fingerprinted as the batch the step consumed)."""
        raise NotImplementedError(f"the {self.kind} source gives its batches whole")

    def module_widths(self) -> dict[str, int] | None:
        """Components of each module, where known before any batch is loaded (None: not known)."""
        return None

    def activation_dims(self) -> tuple[int, ...] | None:
        """Leading dimensions of one member's activations, `(sequences, seq_len)` or `(rows,)`, where known before
        any batch is loaded (None: not known)."""
        return None

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
