"""Bring your own features (issue #18, item 6): each shipped declaration trains and serves end to end.

Per declaration, a process of its own (the spec is chosen once per process, RECSYS_FEATURE_SPEC) runs
``tests/feature_repo/declared_loop.py``: profile and impression/click events with attributes made from
the declaration go through the stream worker's processor into samples, the batch trainer (single-rank
DistributedModelParallel, tables pulled from and pushed to a parameter store) trains on them, and the
serving app scores the same pairs with the trained dense part over the pushed rows.
"""

from __future__ import annotations

import orjson
import pytest

from feature_repo.spec import load_spec
from tests.feature_repo.declared_loop import run_with_spec
from training.model import POSITION_FEATURE


@pytest.mark.slow
@pytest.mark.parametrize("declaration", ["ecommerce", "movielens"])
def test_a_declared_spec_streams_trains_and_serves_end_to_end(declaration: str) -> None:
    done = run_with_spec(declaration, "tests.feature_repo.declared_loop", "60", "50")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    out = orjson.loads(done.stdout.rpartition("RESULT ")[2])
    spec = load_spec(declaration)
    assert (out["spec"], out["spec_hash"]) == (declaration, spec.spec_hash())
    # the stream worker took every event and labelled every impression, clicks included
    assert out["deadletters"] == [] and out["rejected"] == {}
    assert out["samples"] == 60 * 6 and out["positives"] == out["clicks"] > 0
    # every declared feature carried information into the samples (not only ids: the real log)
    assert set(out["distinct_ids"]) == set(spec.sparse_names)
    assert all(n >= 2 for n in out["distinct_ids"].values()), out["distinct_ids"]
    assert all(n >= 3 for n in out["distinct_dense"].values()), out["distinct_dense"]
    # the training tables and the model's features follow the declaration
    assert out["model_sparse"] == spec.sparse_names == out["sparse"]
    assert out["model_dense"] == [*spec.dense_names, POSITION_FEATURE]
    assert out["tables"] == sorted(spec.sparse_names)
    # it trained: the loss of the last steps is below that of the first, the in-sample ranking is learnt
    losses = out["losses"]
    quarter = max(1, len(losses) // 4)
    assert sum(losses[-quarter:]) < sum(losses[:quarter])
    assert out["trained_auc"] > 0.8
    # serving scored every pair as the trainer did, with the trained model and the pushed rows
    assert out["max_served_vs_trained"] < 1e-5
    assert out["served_auc"] == pytest.approx(out["trained_auc"], abs=1e-3)
    assert out["model_version"].startswith("declared/1") and len(out["recommended"]) == 3
