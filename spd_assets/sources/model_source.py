"""What sources that run a model share: a token batch per member, then a forward pass in chunks.

A model source draws each member's inputs (`token_batch`, stored as the `token_batches` asset so
a member can be recomputed and its contexts shown), then runs them through the model on the
device the step leased, chunk by chunk (`activation_chunks`). `spd_assets.sources.streaming`
turns the chunks into the processed activations and statistics, never holding more than one
chunk besides its output.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from spd_assets.config.sources import ModelSourceConfig
from spd_assets.sources.base import ActivationSource, numbered_members
from spd_assets.storage.values import TokenBatch

BYTES_PER_GB = 2**30


ModelConfigT = TypeVar("ModelConfigT", bound=ModelSourceConfig)


class ModelSource(ActivationSource[ModelConfigT]):
    """A source whose activations come from running a model on each member's token batch."""

    has_token_batches: ClassVar[bool] = True
    needs_device: ClassVar[bool] = True

    def member_keys(self) -> list[str]:
        return numbered_members(self.config.n_members)

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.config.memory_budget_gb * BYTES_PER_GB)

    @abstractmethod
    def token_batch(self, member: str, seed: int) -> TokenBatch:
        """The model inputs of one member, drawn deterministically from `seed`."""

    @property
    def tokenizer(self) -> Any | None:
        """The model's tokenizer (a Hugging Face one), or None when inputs are token ids or features only."""
        return None

    def batch_of(self, inputs: np.ndarray) -> TokenBatch:
        """A token batch of these inputs, with the text of each distinct token id when there is a tokenizer."""
        if self.tokenizer is None or not np.issubdtype(inputs.dtype, np.integer):
            return TokenBatch(inputs)
        inputs = inputs.astype(np.int64)
        vocab_ids = np.unique(inputs)
        strings = self.tokenizer.batch_decode([[token_id] for token_id in vocab_ids.tolist()])
        return TokenBatch(inputs, vocab_ids, tuple(strings))

    def decode(self, token_ids: np.ndarray) -> str:
        """One sequence as text: the tokenizer's decoding, or the ids without one."""
        if self.tokenizer is None:
            return " ".join(str(token_id) for token_id in token_ids.tolist())
        return self.tokenizer.decode(token_ids.tolist())

    @abstractmethod
    def module_widths(self) -> dict[str, int]:
        """Components of each module that gives activations (its output units, or SPD's C)."""

    @abstractmethod
    def activation_dims(self) -> tuple[int, ...]:
        """Leading dimensions of one member's activations: `(sequences, seq_len)` or `(rows,)`."""

    @abstractmethod
    def activation_chunks(self, batch: TokenBatch, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        """Module name -> activations of one chunk of the batch (`[rows, seq, C]` or `[rows, C]`), on `device`,
        in the order the batch's rows come; modules in the same order in every chunk."""

    def load_batch(self, member: str, seed: int) -> dict[str, torch.Tensor]:
        """One member's activations as whole CPU tensors (for notebooks and small batches; the pipeline streams)."""
        chunks = [{name: value.cpu() for name, value in chunk.items()}
                  for chunk in self.activation_chunks(self.token_batch(member, seed), torch.device("cpu"))]
        return {name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]}
