"""Serving picks up the online trainers' dense weights from its parameter replica (issue #16, item 3).

Unit tests over the in-process store: what the trainers' dense table holds is what serving
scores with, named by its parameter version, swapped only for newer weights, never mixed with
the champion's, and refused when its shape is not the settings' model.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from core.settings import Settings
from paramserver import open_store
from serving.app import create_app
from serving.components import Components
from serving.features import StaticFeatures
from serving.loader import OnlineDense
from serving.model import EmbeddingDotScorer, ModelHandle
from serving.params import RowFetcher
from tests.serving.test_serving import MemoryReader
from training.model import DenseArch, ModelConfig
from training.online.rows import DENSE_TABLE, DenseSync, dense_table
from training.params import table_configs

S = Settings().override(serving={"reload_poll_s": 0, "explore_share": 0.0, "param_version_poll_s": 0.05})
CONFIG = ModelConfig.of_settings(S.train)


def _vector(arch: DenseArch) -> np.ndarray:
    return torch.nn.utils.parameters_to_vector(arch.parameters()).detach().numpy().copy()


def _parts(n_params: int | None = None):
    arch = DenseArch(CONFIG)
    n = n_params or len(_vector(arch))
    store = open_store("memory", [*table_configs(S.train.embedding_dim, S.train.init_std), dense_table(n)])
    rows = RowFetcher(MemoryReader(store), max_rows=1000, poll_s=0.05)
    fallback = {c.name: c.dim for c in table_configs(S.train.embedding_dim, S.train.init_std)}
    model = ModelHandle(None, lambda: EmbeddingDotScorer(fallback), rows.refresh_version, OnlineDense(rows, CONFIG))
    return store, rows, model, arch


def _scores(scorer, n: int = 5) -> np.ndarray:
    rng = np.random.default_rng(0)
    pooled = {t: rng.normal(size=(n, CONFIG.embedding_dim)).astype(np.float32) for t in CONFIG.sparse_features}
    from feature_repo.spec import SPEC

    return scorer.score(pooled, rng.normal(size=(n, len(SPEC.dense_names))).astype(np.float32))


def test_the_online_dense_weights_are_served_once_written_named_by_their_version_and_only_newer_ones_swap() -> None:
    store, rows, model, arch = _parts()
    model.reload()
    assert model.current is not None and model.current.name == "embedding-dot"
    assert model.refresh_online() is False, "no trainer wrote dense weights yet: the fallback stays"

    sync = DenseSync(store, len(_vector(arch)))
    sync.start(_vector(arch))  # what a trainer does when it joins the group
    written = store.version()
    assert model.refresh_online() is True
    online = model.current
    assert online is not None and online.version == f"online/v{written}"
    assert model.rows_needed == written, "its rows must be of its version or newer"
    reference = _scores_of(arch)
    np.testing.assert_allclose(_scores(online), reference, rtol=1e-5, atol=1e-6)
    assert model.refresh_online() is False, "nothing newer: no swap"
    assert model.reload() == (False, online.version), "the champion poll does not replace the online weights"

    ids, delta = sync.delta(_vector(arch) + 0.05)  # a flush's dense delta
    store.push_deltas({DENSE_TABLE: (ids, delta)})
    assert model.refresh_online() is True
    assert model.current.version == f"online/v{store.version()}"
    assert not np.allclose(_scores(model.current), reference), "the new weights score"
    assert model.reloads == 2


def _scores_of(arch: DenseArch) -> np.ndarray:
    from serving.loader import DLRMScorer

    return _scores(DLRMScorer(arch.eval(), CONFIG, "reference"))


def test_a_dense_table_of_another_shape_is_refused_with_a_clear_message() -> None:
    store, rows, model, arch = _parts(n_params=10 * 256)
    DenseSync(store, 10 * 256).start(np.zeros(10 * 256, np.float32))
    with pytest.raises(ValueError, match="disagree on the model's shape"):
        model.refresh_online()
    model.reload()
    assert model.current is not None and model.current.name == "embedding-dot", "the current scorer stays"


def test_the_app_answers_with_the_online_dense_and_row_versions_and_follows_new_flushes() -> None:
    store, rows, model, arch = _parts()
    sync = DenseSync(store, len(_vector(arch)))
    sync.start(_vector(arch))
    settings = S.override(serving={"online_dense_refresh_s": 0.05})
    comps = Components(model=model, rows=rows, features=StaticFeatures(), follow_stream=False, log_impressions=False)
    body = {"user_id": "u1", "k": 2, "candidate_item_ids": ["a", "b", "c"]}
    with TestClient(create_app(settings, comps)) as client:
        first = client.post("/v1/recommend", json=body).json()
        assert first["model_version"] == f"online/v{store.version()}@ps{store.version()}"
        ids, delta = sync.delta(_vector(arch) - 0.05)
        store.push_deltas({DENSE_TABLE: (ids, delta)})
        newest = f"online/v{store.version()}@ps{store.version()}"
        seen = set()
        deadline = time.monotonic() + 30
        while newest not in seen and time.monotonic() < deadline:
            answer = client.post("/v1/recommend", json=body)
            assert answer.status_code == 200, answer.text
            seen.add(answer.json()["model_version"])
            time.sleep(0.02)
        assert newest in seen, seen
        assert client.get("/readyz").status_code == 200
