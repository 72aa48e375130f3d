"""Token batches stored and read back: ids, the text of each id, and feature rows."""

from __future__ import annotations

import numpy as np
import pytest

from spd_assets.errors import StorageError
from spd_assets.storage.lineage import fingerprint
from spd_assets.storage.values import TokenBatch, value_format


def test_token_ids_and_their_text_round_trip(tmp_path):
    ids = np.array([[5, 7, 5, 0], [7, 9, 9, 9]], dtype=np.int64)
    batch = TokenBatch(ids, np.array([0, 5, 7, 9]), ("", " the", "é", "##ing"))
    path = tmp_path / "member_000.npz"
    value_format(TokenBatch).save(path, batch)
    loaded = value_format(TokenBatch).load(path)
    assert np.array_equal(loaded.inputs, ids) and loaded.inputs.dtype == np.int64
    assert loaded.vocab_strings == ("", " the", "é", "##ing")
    assert loaded.tokens(1) == ["é", "##ing", "##ing", "##ing"]
    assert (loaded.is_tokens, loaded.n_tokens, loaded.sample_dims) == (True, 8, (2, 4))
    assert fingerprint(loaded) == fingerprint(batch)
    with np.load(path) as raw:  # plain arrays, readable without spd-cluster
        assert sorted(raw.files) == ["inputs", "vocab_ids", "vocab_strings"]


def test_feature_rows_have_no_tokens(tmp_path):
    rows = np.random.default_rng(0).random((6, 20), dtype=np.float32)
    path = tmp_path / "rows.npz"
    value_format(TokenBatch).save(path, TokenBatch(rows))
    loaded = value_format(TokenBatch).load(path)
    assert np.array_equal(loaded.inputs, rows) and loaded.vocab_strings == ()
    assert (loaded.is_tokens, loaded.n_tokens, loaded.sample_dims) == (False, 0, (6,))


def test_inconsistent_batches_are_refused():
    with pytest.raises(StorageError, match="expected a 2-D array"):
        TokenBatch(np.zeros(4, dtype=np.int64))
    with pytest.raises(StorageError, match="2 vocab ids but 1 strings"):
        TokenBatch(np.zeros((1, 2), dtype=np.int64), np.array([0, 1]), ("a",))
