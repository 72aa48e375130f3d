"""Models given to the torch source as `package.module:factory` (importable as `tests.sources.tiny_models`)."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 100


class TinyTokenModel(nn.Module):
    """Embedding -> up-projection -> dropout: a model that is not a Hugging Face one (dropout must be off)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.up = nn.Linear(8, 12)
        self.drop = nn.Dropout(0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.up(self.embed(ids)))


def build() -> tuple[nn.Module, None]:
    torch.manual_seed(0)
    return TinyTokenModel(), None


def broken():
    raise RuntimeError("weights file is corrupt")


def not_a_model():
    return {"weights": [1, 2, 3]}
