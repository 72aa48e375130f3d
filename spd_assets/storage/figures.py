"""A Matplotlib figure as PNG bytes: the one way every plot that is stored or shown is rendered."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG bytes; without creation metadata, so equal figures are equal bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
