"""A merge stopped part way, and how a running merge hands out such stops (docs/math.md §7).

A merge's choices depend only on the groups so far and the sampler's generator, so a merge is
resumed exactly from the pairs it chose and the generator's state after the last choice: the
state is rebuilt from the activations, the pairs are merged again without sampling (no costs to
search, the costs and MDL losses are the recorded ones), and sampling goes on from the saved
generator. The history of a resumed merge is bit-identical to an uninterrupted one.

A checkpoint is O(merges) numbers plus the generator's few kilobytes, whatever k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from spd_math.errors import MergeError


@dataclass(frozen=True)
class MergeCheckpoint:
    """The first `n_done` merges of a merge run and the state of its sampler's generator after them.

    Attributes
    ----------
    seed : int
        The seed the run's generator started from (a checkpoint resumes only the run of that seed).
    n_components : int
        Components the run merges (checked against the activations it resumes on).
    selected_pairs : numpy.ndarray
        `[n_done, 2]` int64: the merged pairs, in the numbering of docs/math.md §6.
    pair_costs, mdl_losses : numpy.ndarray
        `[n_done]` float64, as the history records them.
    generator_state : numpy.ndarray
        uint8: `torch.Generator.get_state()` after the last merge (empty with a caller's pair sampler).
    """

    seed: int
    n_components: int
    selected_pairs: np.ndarray
    pair_costs: np.ndarray
    mdl_losses: np.ndarray
    generator_state: np.ndarray

    @property
    def n_done(self) -> int:
        return len(self.selected_pairs)

    def check_resumes(self, n_components: int, seed: int, max_iters: int) -> None:
        """MergeError unless this checkpoint belongs to a run of `n_components` components with `seed`."""
        n = self.n_done
        if self.n_components != n_components or self.seed != seed:
            raise MergeError(f"resume_from: a checkpoint of a run over {self.n_components} components with seed "
                             f"{self.seed} cannot resume a run over {n_components} components with seed {seed}")
        if self.selected_pairs.shape != (n, 2) or self.pair_costs.shape != (n,) or self.mdl_losses.shape != (n,):
            raise MergeError(f"resume_from: expected pairs [{n}, 2], costs [{n}] and losses [{n}], got "
                             f"{self.selected_pairs.shape}, {self.pair_costs.shape} and {self.mdl_losses.shape}")
        if n > max_iters:
            raise MergeError(f"resume_from: holds {n} merges, more than the {max_iters} this run makes")
        if n:
            k_before = n_components - np.arange(n)  # groups before each merge
            pairs = self.selected_pairs
            if (pairs < 0).any() or (pairs >= k_before[:, None]).any() or (pairs[:, 0] == pairs[:, 1]).any():
                raise MergeError("resume_from: holds a pair that is not two different groups of its iteration")

    def generator(self) -> torch.Generator:
        generator = torch.Generator()
        generator.set_state(torch.from_numpy(self.generator_state.copy()))
        return generator


class CheckpointSink(Protocol):
    """Where a running merge hands its checkpoints: asked `due()` after every merge (cheap), given one when due."""

    def due(self) -> bool: ...

    def save(self, checkpoint: MergeCheckpoint) -> None: ...
