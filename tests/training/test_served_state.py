"""The served state is a dense part and its rows, gated together (issue #15, item 4).

Real Redis (a training copy and an inference replica followed by the delta-stream
replicator), a real MLflow registry (SQLite), real dense artifacts, and the serving app over
HTTP reading the replica. Jobs are stood in for by what a job leaves behind: rows staged
under ``job-<run id>`` and a registered model version tagged like the trainer tags it.

- a forced-bad challenger (its rows overwritten with noise) is refused by the gate, and the
  served scores of a fixed set of requests are bit-identical before its push, after it, and
  after the refusal; the next job pulls the champion's rows;
- a better challenger is promoted (rows, then alias) and serving answers with both;
- a rollback returns the previous champion's scores exactly.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from core.settings import Settings
from feature_repo.spec import SPEC, item_id_key, user_id_key
from paramserver import Replicator, Rows, open_reader
from paramserver.redis_store import RedisStore
from serving.app import create_app
from serving.components import Components
from serving.features import StaticFeatures
from serving.loader import MlflowLoader
from serving.model import EmbeddingDotScorer, ModelHandle
from serving.params import RowFetcher
from training.lifecycle import gate, served
from training.lifecycle.publish import wait_for_replicas
from training.model import DenseArch, ModelConfig, save_dense
from training.params import job_stage, table_configs

pytestmark = pytest.mark.integration

USERS = [f"u{i}" for i in range(12)]
ITEMS = [f"i{j}" for j in range(40)]
PAIRS = [{"user_id": u, "item_id": i} for u in USERS[:6] for i in ITEMS[:10]]
TOKEN = "served-state-token"


def _serve(app):
    from tests.serving.test_serving_integration import serve

    return serve(app)


class World:
    """One MLflow registry, one parameter service with a replica, and helpers to stand in for jobs."""

    def __init__(self, s: Settings, tmp: Path) -> None:
        self.s, self.tmp = s, tmp
        self.client = gate.client_for(s.mlflow.tracking_uri)
        self.experiment = self.client.create_experiment("served-state", artifact_location=(tmp / "art").as_uri())
        self.client.create_registered_model(s.train.model_name)
        self.config = ModelConfig.from_spec(SPEC, s.train.embedding_dim, s.train.dense_arch, s.train.over_arch)
        self.tables = {t.name: t for t in table_configs(s.train.embedding_dim, s.train.init_std)}
        self.store = RedisStore.from_settings(s.ps, list(self.tables.values()))

    def job(self, seed: int, noise: float = 0.05, auc: float = 0.7) -> str:
        """What a training job leaves: its rows staged, its dense part registered as a challenger."""
        rng = np.random.default_rng(seed)
        base = self.store.version()
        run = self.client.create_run(self.experiment)
        run_id = run.info.run_id
        ids = {
            "user_id": np.array([user_id_key(u) for u in USERS], np.int64),
            "item_id": np.array([item_id_key(i) for i in ITEMS], np.int64),
        }
        dim = self.s.train.embedding_dim
        self.store.stage(job_stage(run_id)).push(
            {
                t: Rows(v, rng.normal(0, noise, (len(v), dim)).astype(np.float32), np.ones((len(v), 1), np.float32))
                for t, v in ids.items()
            }
        )
        torch.manual_seed(seed)
        arch = DenseArch(self.config)
        path = save_dense(self.tmp / f"dense-{seed}" / "dense.pt", self.config, arch.state_dict())
        self.client.log_artifact(run_id, str(path), "dense")
        self.client.log_metric(run_id, gate.CHALLENGER_METRIC, auc)
        self.client.set_terminated(run_id)
        version = self.client.create_model_version(
            self.s.train.model_name,
            source=f"{run.info.artifact_uri}/dense",
            run_id=run_id,
            tags={"ps_stage": job_stage(run_id), "ps_version_pulled": str(base)},
        )
        return str(version.version)

    def publish(self, ps_version: int, base: str) -> None:
        wait_for_replicas(self.s, ps_version, timeout_s=60, poll_s=0.01)
        r = httpx.post(f"{base}/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        assert r.status_code == 200, r.text


def _scores(base: str) -> tuple[str, list[float]]:
    r = httpx.post(f"{base}/v1/score", json={"pairs": PAIRS}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    return body["model_version"], [p["score"] for p in body["scores"]]


def test_a_refused_challenger_changes_no_served_score_and_a_rollback_restores_the_champion_exactly(
    redis_factory, tmp_path: Path
) -> None:
    source, replica = redis_factory("served-source"), redis_factory("served-replica")
    s = Settings().override(
        ps={"shards": [source.url], "replicas": [replica.url], "namespace": f"sv{uuid.uuid4().hex[:8]}"},
        mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        serving={"admin_token": TOKEN, "reload_poll_s": 0, "request_deadline_s": 60.0, "param_cache_rows": 0},
    )
    world = World(s, tmp_path)
    replica_store = RedisStore.from_settings(s.ps, list(world.tables.values()), shards=[replica.url])
    stop = threading.Event()
    replicating = threading.Thread(target=Replicator(world.store, replica_store, poll_s=0.01).run, args=(stop,))
    replicating.start()
    rows = RowFetcher(open_reader(s.ps, [replica.url]), 0, s.serving.param_version_poll_s)
    model = ModelHandle(
        MlflowLoader(s.mlflow.tracking_uri, s.train.model_name, "champion"),
        lambda: EmbeddingDotScorer({"user_id": s.train.embedding_dim, "item_id": s.train.embedding_dim}),
        rows_version=rows.refresh_version,
    )
    comps = Components(model=model, rows=rows, features=StaticFeatures(), follow_stream=False, log_impressions=False)
    name = s.train.model_name
    try:
        with _serve(create_app(s, comps)) as base:
            # the first champion: promoted (rows, then alias), published, served
            first = world.job(seed=1)
            promoted = gate.promote_challenger(s, gate.Decision(True, "no champion yet", first, 0.7, None, None, 0.0))
            assert promoted == {"champion": first, "promoted": True, "ps_version": world.store.version()}
            world.publish(promoted["ps_version"], base)
            champion = _scores(base)
            assert champion[0] == f"{name}/{first}@ps{promoted['ps_version']}"  # the served state, named as one
            champion_rows = world.store.pull_many({t: r.ids for t, r in world.store.read_all().items()})

            # a forced-bad challenger: noise rows, staged; nothing served changes
            bad = world.job(seed=99, noise=3.0, auc=0.5)
            stage = world.client.get_model_version(name, bad).tags["ps_stage"]
            assert _scores(base) == champion
            gate.record_champion_score(world.client, name, bad, first, 0.7)
            decision = gate.gate_challenger(s, bad, s.gate.tolerance)
            assert not decision.promote and "worse" in decision.reason
            assert stage not in world.store.stages()
            assert world.client.get_model_version(name, bad).tags[served.TAG_PS_DROPPED] == "true"
            assert _scores(base) == champion, "a refused challenger changed a served score"
            # the next job starts from the champion's rows
            again = world.store.pull_many({t: r.ids for t, r in champion_rows.items()})
            for table, before in champion_rows.items():
                np.testing.assert_array_equal(again[table].weights, before.weights)
                np.testing.assert_array_equal(again[table].state, before.state)

            # a better challenger is promoted: new dense part and its rows, served together
            better = world.job(seed=2)
            gate.record_champion_score(world.client, name, better, first, 0.6)
            decision = gate.gate_challenger(s, better, s.gate.tolerance)
            assert decision.promote
            promoted = gate.promote_challenger(s, decision)
            assert promoted["champion"] == better and promoted["ps_version"] == world.store.version()
            world.publish(promoted["ps_version"], base)
            newer = _scores(base)
            assert newer[0] == f"{name}/{better}@ps{promoted['ps_version']}" and newer[1] != champion[1]
            assert world.client.get_model_version(name, better).tags[served.TAG_PREVIOUS] == first

            # rollback: the previous champion's dense part and rows, exactly as served before
            done = served.rollback(s)
            assert done["champion"] == first and done["rolled_back"] == better
            world.publish(done["ps_version"], base)
            restored = _scores(base)
            assert restored[1] == champion[1], "the rollback did not restore the champion's scores exactly"
            assert restored[0] == f"{name}/{first}@ps{done['ps_version']}"
            assert gate.champion_version(world.client, name) == first
            with pytest.raises(served.LifecycleError, match="first champion"):
                served.rollback(s)
    finally:
        stop.set()
        replicating.join(timeout=30)
        for area in world.store.stages():
            world.store.drop_stage(area)
        world.store.close()
        replica_store.close()
