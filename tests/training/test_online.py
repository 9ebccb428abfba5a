"""The online trainer's parts without Kafka (issue #16): the guard, the row cache, one-version flushes.

The parameter service is the in-memory store (the same ``BaseStore`` logic as Redis); the
samples come from the traffic simulator. Kafka, Redis and processes: test_online_integration.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from core.settings import Settings
from feature_repo.contract import Sample
from feature_repo.spec import SPEC
from paramserver import BadRows, open_store
from traffic.simulator import SimConfig
from traffic.synthetic import simulate_samples
from training.data import to_columns
from training.model import DenseArch, ModelConfig
from training.online.guard import Decision, FlushQuality, Guard, GuardConfig
from training.online.learner import LearnerConfig, OnlineLearner
from training.online.rows import ADAGRAD_EPS, DENSE_TABLE, RowCache, dense_table
from training.params import table_configs


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """As the trainer runs (RECSYS_ONLINE_TORCH_THREADS): small batches are several times faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


GUARD = GuardConfig(margin=0.05, log_loss_margin=0.15, max_calibration=3.0, trailing=5, warmup=2, min_samples=50)


def _quality(auc: float, log_loss: float = 0.3, calibration: float = 1.0, samples: int = 100) -> FlushQuality:
    return FlushQuality(samples=samples, positives=10, auc=auc, log_loss=log_loss, calibration=calibration)


# --------------------------------------------------------------------------- the guard


def test_guard_warms_up_then_refuses_a_drop_beyond_the_margin_and_halts() -> None:
    guard = Guard(GUARD)
    assert guard.judge(_quality(0.70)).decision is Decision.PUBLISH  # warming up: no reference yet
    assert guard.judge(_quality(0.74)).decision is Decision.PUBLISH
    assert guard.trailing()[0] == pytest.approx(0.72)
    assert guard.judge(_quality(0.68)).decision is Decision.PUBLISH  # within the margin
    verdict = guard.judge(_quality(0.60))
    assert verdict.decision is Decision.REFUSE and "AUC" in verdict.reason and guard.halted
    # the refused flush does not drag the trailing level down: recovery is measured against the old level
    level = guard.trailing()[0]
    assert guard.judge(_quality(0.62)).decision is Decision.REFUSE
    assert guard.trailing()[0] == level
    # too few samples to judge while halted: held, still halted
    assert guard.judge(_quality(0.9, samples=10)).decision is Decision.HOLD and guard.halted
    resumed = guard.judge(_quality(0.71))
    assert resumed.decision is Decision.PUBLISH and "resumes" in resumed.reason and not guard.halted


def test_guard_refuses_log_loss_and_calibration_drift() -> None:
    guard = Guard(GUARD)
    guard.judge(_quality(0.7, log_loss=0.30))
    guard.judge(_quality(0.7, log_loss=0.32))
    assert guard.judge(_quality(0.7, log_loss=0.50)).decision is Decision.REFUSE
    guard = Guard(GUARD)
    guard.judge(_quality(0.7))
    guard.judge(_quality(0.7))
    assert guard.judge(_quality(0.7, calibration=3.5)).decision is Decision.REFUSE
    assert guard.judge(_quality(0.7, calibration=0.2)).decision is Decision.REFUSE
    assert guard.judge(_quality(0.7, calibration=1.4)).decision is Decision.PUBLISH


def test_a_small_or_one_class_flush_is_published_unjudged_when_not_halted() -> None:
    guard = Guard(GUARD)
    one_class = FlushQuality.of(np.full(80, 0.1), np.zeros(80))
    assert not one_class.judgeable and math.isnan(one_class.auc)
    assert guard.judge(one_class).decision is Decision.PUBLISH
    assert guard.trailing() == (pytest.approx(math.nan, nan_ok=True), pytest.approx(math.nan, nan_ok=True))


def test_flush_quality_matches_its_definitions() -> None:
    scores = np.array([0.9, 0.2, 0.6, 0.4])
    labels = np.array([1, 0, 0, 1])
    q = FlushQuality.of(scores, labels)
    expected_loss = -np.mean([np.log(0.9), np.log(0.8), np.log(0.4), np.log(0.4)])
    assert q.log_loss == pytest.approx(expected_loss)
    assert q.calibration == pytest.approx(scores.mean() / 0.5)
    assert q.auc == pytest.approx(0.75)  # 3 of the 4 positive-negative pairs ordered right


# --------------------------------------------------------------------------- the parameter service


def _store(dim: int = 4):
    from paramserver import TableConfig

    return open_store("memory", [TableConfig("a", dim, 1, init_std=0.1), TableConfig("b", dim, 1, init_std=0.1)])


def test_push_deltas_writes_every_table_as_one_version_and_deltas_to_one_row_add_up() -> None:
    store = _store()
    before = store.pull_many({"a": np.array([1, 2]), "b": np.array([7])})
    v0 = store.version()
    ones = np.ones((2, 5), np.float32)
    version = store.push_deltas({"a": (np.array([1, 2]), ones), "b": (np.array([7]), 2 * ones[:1])})
    assert version == v0 + 1
    store.push_delta("a", np.array([1]), np.full((1, 4), 0.5, np.float32))  # a second trainer, same row
    after = store.pull_many({"a": np.array([1, 2]), "b": np.array([7])})
    np.testing.assert_allclose(after["a"].weights, before["a"].weights + [[1.5] * 4, [1.0] * 4], rtol=1e-6)
    np.testing.assert_allclose(after["a"].state, before["a"].state + 1.0)
    np.testing.assert_allclose(after["b"].weights, before["b"].weights + 2.0, rtol=1e-6)
    with pytest.raises(BadRows):  # one bad table: nothing of the flush is written
        store.push_deltas({"a": (np.array([1]), ones[:1]), "b": (np.array([7]), np.ones((1, 3)))})
    assert store.version() == version + 1


def test_row_cache_applies_row_wise_adagrad_and_owes_exactly_its_updates() -> None:
    store = _store()
    cache = RowCache(store, ["a", "b"])
    slots = cache.slots({"a": np.array([3, 5])})["a"]
    pulled = store.pull("a", np.array([3, 5]))
    grad = np.array([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]], np.float32)
    cache.adagrad("a", slots, grad, lr=0.1)
    state = pulled.state + np.mean(grad**2, axis=1, keepdims=True)
    expected = pulled.weights - 0.1 * grad / (np.sqrt(state) + ADAGRAD_EPS)
    np.testing.assert_allclose(cache.weights("a", slots), expected, rtol=1e-6)
    ids, deltas = cache.deltas()["a"]
    np.testing.assert_array_equal(ids, [3, 5])
    np.testing.assert_allclose(deltas[:, :4], expected - pulled.weights, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(deltas[:, 4:], state - pulled.state, rtol=1e-6)
    store.push_deltas(cache.deltas())
    cache.clear_deltas()
    assert cache.refresh() == 2  # our own flush: the service's sums replace our copies
    np.testing.assert_allclose(cache.weights("a", slots), expected, rtol=1e-6)
    # another trainer updates row 5: a refresh re-pulls it, row 3 stays as it is
    store.push_delta("a", np.array([5]), np.ones((1, 4), np.float32))
    assert cache.refresh() == 1
    np.testing.assert_allclose(cache.weights("a", slots)[1], expected[1] + 1.0, rtol=1e-6)
    np.testing.assert_allclose(cache.weights("a", slots)[0], expected[0], rtol=1e-6)
    assert cache.deltas() == {}


def test_row_cache_grows_past_its_first_capacity_keeping_every_row() -> None:
    store = _store()
    cache = RowCache(store, ["a", "b"])
    batches = [np.arange(k * 700, (k + 1) * 700, dtype=np.int64) for k in range(4)]  # 2800 ids: grows twice
    for ids in batches:
        cache.slots({"a": ids})
    everything = np.concatenate(batches)
    slots = cache.slots({"a": everything})["a"]
    assert cache.rows("a") == len(everything) and cache.pulled == len(everything)
    np.testing.assert_array_equal(cache.weights("a", slots), store.pull("a", everything).weights)
    cache.adagrad("a", slots[-3:], np.ones((3, 4), np.float32), lr=0.1)
    np.testing.assert_array_equal(cache.deltas()["a"][0], everything[-3:])


# --------------------------------------------------------------------------- the learner


def _learner_store():
    s = Settings()
    t = s.train
    config = ModelConfig.from_spec(SPEC, t.embedding_dim, t.dense_arch, t.over_arch)
    n_params = sum(p.numel() for p in DenseArch(config).parameters())
    store = open_store("memory", [*table_configs(t.embedding_dim, t.init_std), dense_table(n_params)])
    return store, LearnerConfig(config, t.embedding_lr, t.dense_lr, 0, None)


def _flipped(samples: list[Sample]) -> list[Sample]:
    return [s.model_copy(update={"label": 1 - s.label}) for s in samples]


def _train(learner: OnlineLearner, samples: list[Sample], batch: int = 200, flush_every: int = 3) -> list:
    columns = to_columns(samples)
    results = []
    for k, start in enumerate(range(0, len(columns), batch)):
        learner.train_batch(columns, np.arange(start, min(start + batch, len(columns))))
        if k % flush_every == flush_every - 1:
            results.append(learner.flush())
    return results


def test_a_poisoned_stream_is_refused_whole_and_publishing_resumes_when_quality_returns() -> None:
    store, config = _learner_store()
    learner = OnlineLearner(store, config, Guard(GUARD))
    clean = simulate_samples(SimConfig(users=80, items=50, requests=900, seed=5)).samples
    published = _train(learner, clean[:6000])
    assert all(r.verdict.publish and r.version is not None for r in published)
    good_version, good_rows = store.version(), store.read_all()
    poisoned = _flipped(clean[6000:8400])
    refused = _train(learner, poisoned)
    assert refused and all(r.verdict.decision is Decision.REFUSE and r.version is None for r in refused)
    assert store.version() == good_version  # nothing of the poisoned flushes reached the service
    for table, rows in store.read_all().items():
        np.testing.assert_array_equal(rows.weights, good_rows[table].weights)
        np.testing.assert_array_equal(rows.state, good_rows[table].state)
    resumed = _train(learner, clean[8400:])
    assert resumed[-1].verdict.publish and store.version() > good_version


def test_a_halted_learner_with_only_small_flushes_resumes_once_their_scored_samples_add_up() -> None:
    store, config = _learner_store()
    learner = OnlineLearner(store, config, Guard(GUARD))
    clean = simulate_samples(SimConfig(users=80, items=50, requests=900, seed=5)).samples
    _train(learner, clean[:6000])
    refused = _train(learner, _flipped(clean[6000:8400]))
    assert refused[-1].verdict.decision is Decision.REFUSE and learner.guard.halted
    halted_at = store.version()
    # a low rate: every flush holds 20 clean samples, fewer than the guard's minimum (50) to judge
    small = _train(learner, clean[8400:8600], batch=20, flush_every=1)
    held = [r for r in small if r.verdict.decision is Decision.HOLD]
    assert held and all(r.samples == 20 and r.version is None for r in held)
    # the held flushes' scores are judged together: 20, 40, then 60 scored samples, enough to judge
    assert [r.quality.samples for r in small[:3]] == [20, 40, 60]
    assert small[2].verdict.publish and "publishing resumes" in small[2].verdict.reason
    assert not learner.guard.halted and store.version() > halted_at
    # after a judgement the count starts again
    assert small[3].quality.samples == 20


def test_two_learners_on_one_store_both_count_and_share_dense_weights() -> None:
    store, config = _learner_store()
    first, second = OnlineLearner(store, config, Guard(GUARD)), OnlineLearner(store, config, Guard(GUARD))
    samples = simulate_samples(SimConfig(users=30, items=20, requests=120, seed=6)).samples
    pushed: list[dict] = []
    half = len(samples) // 2
    for learner, part in ((first, samples[:half]), (second, samples[half:])):
        learner.train_batch(to_columns(part))
    touched: dict[str, set[int]] = {name: set() for name in config.model.sparse_features}
    for learner in (first, second):
        for name, (ids, _) in learner.cache.deltas().items():
            touched[name] |= set(ids.tolist())
    shared = {name: np.array(sorted(ids)) for name, ids in touched.items() if ids}
    before = store.pull_many(shared)
    for learner in (first, second):
        learner.flush(before_push=pushed.append)
    after = store.pull_many(shared)
    both = set(pushed[0]["item_id"][0].tolist()) & set(pushed[1]["item_id"][0].tolist())
    assert both, "the two halves of the stream share items"
    for name, ids in shared.items():
        expected = before[name].weights.astype(np.float64)
        for deltas in pushed:
            if name in deltas:
                got_ids, rows = deltas[name]
                expected[np.searchsorted(ids, got_ids)] += rows[:, : expected.shape[1]]
        np.testing.assert_allclose(after[name].weights, expected, atol=1e-6)
    # dense weights: both deltas are in the service, and the first trainer picks up the second's on its next flush
    assert DENSE_TABLE in pushed[0] and DENSE_TABLE in pushed[1]
    second_dense = [p.detach().numpy().copy() for p in second.dense.parameters()]
    first.flush()  # nothing new: re-pulls what the second trainer flushed after it
    for mine, theirs in zip(first.dense.parameters(), second_dense):
        np.testing.assert_array_equal(mine.detach().numpy(), theirs)


def test_rows_unchanged_by_a_refused_flush_are_pulled_fresh_after_it() -> None:
    store, config = _learner_store()
    learner = OnlineLearner(store, config, Guard(GUARD))
    samples = simulate_samples(SimConfig(users=30, items=20, requests=60, seed=7)).samples
    learner.train_batch(to_columns(samples))
    assert learner.cache.deltas()
    learner.discard()
    assert learner.cache.deltas() == {} and learner.cache.rows("item_id") == 0
    ids = np.array([samples[0].sparse["item_id"][0]])
    np.testing.assert_array_equal(
        learner.cache.weights("item_id", learner.cache.slots({"item_id": ids})["item_id"]),
        store.pull("item_id", ids).weights,
    )


def test_a_batch_where_a_feature_has_no_ids_pools_it_to_zeros_and_trains() -> None:
    store, config = _learner_store()
    learner = OnlineLearner(store, config, Guard(GUARD))
    samples = simulate_samples(SimConfig(users=10, items=10, requests=3, seed=8)).samples[:4]
    bare = [s.model_copy(update={"sparse": {**s.sparse, "genres": []}}) for s in samples]
    scores = learner.train_batch(to_columns(bare))
    assert scores.shape == (4,) and np.isfinite(scores).all()
    assert "genres" not in learner.cache.deltas() and "item_id" in learner.cache.deltas()


def test_dense_weights_are_written_on_their_slower_cadence_named_by_parameter_version(tmp_path) -> None:
    from training.model import load_dense
    from training.online.service import OnlineTrainer

    store, config = _learner_store()
    learner = OnlineLearner(store, config, Guard(GUARD))
    s = Settings().override(online={"dense_dir": tmp_path, "dense_publish_interval_s": 3600})
    trainer = OnlineTrainer(s, store, learner)
    trainer._publish_dense(7)
    assert not list(tmp_path.iterdir()), "only the owner of partition 0 writes them"
    trainer.owned = {0, 2}
    trainer._publish_dense(8)
    trainer._publish_dense(9)  # within the interval: not written again
    assert [p.name for p in tmp_path.iterdir()] == ["dense-v8.pt"]
    loaded_config, arch, extra = load_dense(tmp_path / "dense-v8.pt")
    assert loaded_config == config.model and extra == {"ps_version": 8}
    for name, value in learner.dense.state_dict().items():
        assert torch.equal(arch.state_dict()[name], value)


def test_a_reset_writes_the_given_dense_weights_over_the_groups_and_a_plain_start_keeps_them() -> None:
    from training.model import DenseArch

    store, config = _learner_store()
    first = OnlineLearner(store, config, Guard(GUARD))
    trained = [p.detach().numpy().copy() for p in first.dense.parameters()]
    champion = DenseArch(config.model)
    with torch.no_grad():
        for p in champion.parameters():
            p.add_(0.5)  # another dense part than the group's
    kept = OnlineLearner(store, config, Guard(GUARD), initial_dense=DenseArch(config.model))
    for mine, group in zip(kept.dense.parameters(), trained):
        np.testing.assert_array_equal(mine.detach().numpy(), group)  # --dense only seeds an empty table
    reset = OnlineLearner(store, config, Guard(GUARD), initial_dense=champion, reset_dense=True)
    after = OnlineLearner(store, config, Guard(GUARD))
    for learner in (reset, after):
        for mine, wanted in zip(learner.dense.parameters(), champion.parameters()):
            np.testing.assert_array_equal(mine.detach().numpy(), wanted.detach().numpy())


def test_score_learns_nothing_and_equals_the_progressive_score_of_the_next_batch() -> None:
    store, config = _learner_store()
    learner = OnlineLearner(store, config, Guard(GUARD))
    columns = to_columns(simulate_samples(SimConfig(users=10, items=10, requests=5, seed=9)).samples)
    first = learner.score(columns)
    assert learner.cache.deltas() == {} and learner.samples_since_flush == 0
    np.testing.assert_allclose(learner.score(columns), first)
    np.testing.assert_allclose(learner.train_batch(columns), first, rtol=1e-6)
    assert not np.allclose(learner.score(columns), first)  # the step changed the model
