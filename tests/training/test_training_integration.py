"""`recsys train` end to end on real Kafka, Redis (parameter service) and MLflow (SQLite backend).

One module-scoped environment: a samples topic, a private Redis for the parameter service
and an MLflow database under a temp folder. The first job (two ranks, gloo) trains on
simulated traffic big enough for the quality check; later tests add small windows.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from core.kafka import end_offsets, ensure_topics
from core.settings import PROJECT_ROOT
from feature_repo.spec import SPEC
from traffic.simulator import SimConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# a small world with plenty of traffic per user and item, so the ids can be learned too
QUALITY_SIM = SimConfig(users=200, items=100, requests=20_000, seed=11)


@dataclass
class Env:
    kafka: str
    redis_url: str
    topic: str
    mlflow_uri: str
    namespace: str
    tmp: Path

    def vars(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "RECSYS_KAFKA_BOOTSTRAP": self.kafka,
                "RECSYS_PS_SHARDS": json.dumps([self.redis_url]),
                "RECSYS_PS_NAMESPACE": self.namespace,
                "RECSYS_TOPIC_SAMPLES": self.topic,
                "RECSYS_MLFLOW_TRACKING_URI": self.mlflow_uri,
                "RECSYS_RUN_DIR": str(self.tmp / "run"),
                "RECSYS_TRAIN_RANKS": "2",
                "PYTHONWARNINGS": "ignore",
            }
        )
        env.update(extra)
        return env

    def store(self):
        from core.settings import ParamServerSettings
        from training.params import open_training_store, table_configs

        ps = ParamServerSettings(shards=[self.redis_url], namespace=self.namespace)
        return open_training_store(ps, table_configs(16, 0.05))


def train(env: Env, *args: str, **extra: str) -> tuple[int, dict | None, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "recsys.cli", "train", "--json", *args],
        env=env.vars(**extra),
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    text = proc.stdout
    start = text.find("{")
    outcome = json.loads(text[start:]) if start >= 0 else None
    return proc.returncode, outcome, proc.stdout + proc.stderr


def produce(env: Env, config: SimConfig, extra: list[bytes] | None = None):
    from traffic.synthetic import produce_samples, simulate_samples

    synthetic = simulate_samples(config)
    produce_samples(env.kafka, env.topic, synthetic.samples, extra)
    return synthetic


@pytest.fixture(scope="module")
def env(kafka_bootstrap, redis_factory, tmp_path_factory) -> Env:
    tmp = tmp_path_factory.mktemp("training")
    e = Env(
        kafka_bootstrap,
        redis_factory("training").url,
        f"samples.{uuid.uuid4().hex[:8]}",
        f"sqlite:///{tmp / 'mlflow.db'}",
        f"t{uuid.uuid4().hex[:6]}",
        tmp,
    )
    asyncio.run(ensure_topics(kafka_bootstrap, {e.topic: 2}))
    return e


@pytest.fixture(scope="module")
def first_job(env: Env):
    from traffic.synthetic import write_truth

    synthetic = produce(env, QUALITY_SIM)
    truth = env.tmp / "truth.jsonl"
    write_truth(truth, synthetic)
    ends = asyncio.run(end_offsets(env.kafka, env.topic))
    code, outcome, log = train(env, "--truth", str(truth))
    assert code == 0, log[-4000:]
    return outcome, synthetic, ends


def _client(env: Env):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=env.mlflow_uri, registry_uri=env.mlflow_uri)


def _manifest(env: Env, run_id: str) -> dict:
    import mlflow

    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="manifest.json", tracking_uri=env.mlflow_uri, dst_path=str(env.tmp / run_id)
    )
    return json.loads(Path(path).read_text())


def test_two_rank_job_stages_rows_logs_run_and_registers_challenger(env: Env, first_job) -> None:
    outcome, synthetic, ends = first_job
    assert outcome["status"] == "trained"
    assert outcome["ps_version_before"] == 0 and outcome["ps_stage"] == f"job-{outcome['run_id']}"
    with env.store() as store:
        users = np.unique([s.sparse["user_id"][0] for s in synthetic.samples])
        from paramserver import initial_rows

        init_w, _ = initial_rows(store.tables["user_id"], users)
        # the served rows are untouched until the model is promoted ...
        assert store.version() == 0
        np.testing.assert_array_equal(store.pull("user_id", users).weights, init_w)
        # ... the trained rows wait in the job's staging area, moved from their initial rows, with Adagrad state
        pulled = store.stage(outcome["ps_stage"]).pull("user_id", users)
        moved = np.abs(pulled.weights - init_w).max(axis=1) > 1e-6
        assert moved.mean() > 0.9
        assert (pulled.state[moved] > 0).all()

    client = _client(env)
    run = client.get_run(outcome["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["ranks"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == int(run.data.metrics["train_steps"]) > 0
    for key in ("eval_auc", "eval_log_loss", "eval_calibration", "eval_oracle_auc"):
        assert np.isfinite(run.data.metrics[key]), key

    manifest = _manifest(env, outcome["run_id"])
    assert manifest["ps_stage"] == outcome["ps_stage"] and manifest["ps_version_pulled"] == 0
    assert manifest["offsets"]["end"] == {str(p): o for p, o in ends.items()}
    assert manifest["offsets"]["start"] == {}
    assert manifest["feature_spec_hash"] == SPEC.spec_hash()
    assert manifest["rows_pulled"]["user_id"] == QUALITY_SIM.users
    assert 0 < manifest["rows_pushed"]["user_id"] <= QUALITY_SIM.users
    assert manifest["read"]["samples"] == len(synthetic.samples)
    assert set(manifest["table_owners"].values()) == {0, 1}  # the tables really are spread over both ranks

    version = client.get_model_version_by_alias("recsys-dlrm", "challenger")
    assert str(version.version) == outcome["model_version"]
    assert version.tags["role"] == "challenger"
    assert version.tags["ps_stage"] == outcome["ps_stage"] and "ps_version" not in version.tags

    import mlflow

    from training.model import load_dense

    folder = mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(env.tmp / "dense"))
    config, arch, extra = load_dense(Path(folder) / "dense.pt")
    assert config.sparse_features == tuple(SPEC.sparse_names)
    assert extra["ps_stage"] == outcome["ps_stage"]
    # beside the weights, the MLmodel file gives the version its signature
    from mlflow.models import Model

    signature = Model.load(str(Path(folder) / "MLmodel")).signature
    assert [spec["name"] for spec in signature.inputs.to_dict()] == ["dense", "pooled"]
    assert list(signature.inputs.to_dict()[1]["tensor-spec"]["shape"]) == [
        -1,
        len(SPEC.sparse_names),
        config.embedding_dim,
    ]
    # named by no orchestrator, the run is named after its window, which is its dataset input
    assert run.info.run_name == f"{env.topic}@0-{sum(ends.values())}"
    (window,) = [d.dataset for d in run.inputs.dataset_inputs]
    assert window.source_type == "kafka" and json.loads(window.source)["partitions"]["0"]["start"] == 0
    assert json.loads(window.profile)["records"] == sum(ends.values())
    assert json.loads(run.data.tags["recsys_missing_metrics"]) == {}  # every metric there, the oracle's too
    import torch

    probs = torch.sigmoid(
        arch(
            torch.zeros(3, len(config.dense_features)),
            torch.zeros(3, len(config.sparse_features), config.embedding_dim),
        )
    )
    assert probs.shape == (3,) and bool(((probs > 0) & (probs < 1)).all())


def test_quality_eval_auc_within_002_of_oracle(env: Env, first_job) -> None:
    outcome, _, _ = first_job
    m = outcome["metrics"]
    print(
        f"\neval AUC {m['eval_auc']:.4f}, oracle AUC {m['eval_oracle_auc']:.4f} on {int(m['eval_samples'])} "
        f"held-out samples (gap {m['eval_oracle_auc'] - m['eval_auc']:.4f}); log loss {m['eval_log_loss']:.4f}, "
        f"calibration {m['eval_calibration']:.3f}"
    )
    assert m["eval_oracle_coverage"] == 1.0
    assert m["eval_auc"] >= m["eval_oracle_auc"] - 0.02
    run = _client(env).get_run(outcome["run_id"])
    assert run.data.metrics["eval_oracle_auc"] == pytest.approx(m["eval_oracle_auc"])
    assert run.data.metrics["eval_auc"] == pytest.approx(m["eval_auc"])


def test_second_job_continues_from_recorded_offsets_and_stages_only_window_rows(env: Env, first_job) -> None:
    _, _, first_ends = first_job
    with env.store() as store:
        before = store.version()
    # a different world (other user ids) so ids outside this window exist in the store
    second = SimConfig(users=50, items=100, requests=200, seed=12)
    bad = [b"not json", b'{"sample_id": "x"}']
    synthetic = produce(env, second, extra=bad)
    # a duplicate delivery of one sample (producer retry) must count once
    from traffic.synthetic import produce_samples

    produce_samples(env.kafka, env.topic, synthetic.samples[:1])
    code, outcome, log = train(env)
    assert code == 0, log[-4000:]
    assert outcome["status"] == "trained"
    assert outcome["offsets"]["start"] == {str(p): o for p, o in first_ends.items()}
    manifest = _manifest(env, outcome["run_id"])
    assert manifest["read"]["samples"] == len(synthetic.samples)
    assert manifest["read"]["duplicates"] == 1
    assert sum(manifest["read"]["rejected"].values()) == len(bad)

    window = {name: {i for s in synthetic.samples for i in s.sparse[name]} for name in SPEC.sparse_names}
    with env.store() as store:
        assert store.version() == before  # nothing served changes before promotion
        staged = store.stage(outcome["ps_stage"]).read_all()
        assert staged["user_id"].ids.size > 0
        for table, rows in staged.items():
            assert set(rows.ids.tolist()) <= window[table], table
    # nothing new since: the job ends cleanly, saying so (in-process: this exit happens before any collective)
    import torch

    from core.settings import Settings
    from training.outcome import JobStatus
    from training.worker import run_job

    settings = Settings().override(
        kafka={"bootstrap": env.kafka, "topic_samples": env.topic},
        ps={"shards": [env.redis_url], "namespace": env.namespace},
        mlflow={"tracking_uri": env.mlflow_uri},
    )
    again = run_job(settings, 0, 1, torch.device("cpu"))
    assert again.status is JobStatus.NO_NEW_SAMPLES
    assert again.message is not None and "no new samples" in again.message
    assert again.offsets is not None
    assert again.offsets.end == {int(p): o for p, o in outcome["offsets"]["end"].items()}


def test_killed_job_leaves_parameter_service_unchanged_and_rerun_succeeds(env: Env, first_job) -> None:
    client = _client(env)
    synthetic = produce(env, SimConfig(users=60, items=100, requests=300, seed=13))
    users = np.unique([s.sparse["user_id"][0] for s in synthetic.samples])
    with env.store() as store:
        version = store.version()
        rows_before = store.pull("user_id", users).weights

    code, outcome, log = train(env, "--epochs", "3", "--batch-size", "64", RECSYS_TRAIN_CRASH_AFTER_STEPS="3")
    assert code != 0
    assert outcome is None or outcome["status"] == "error"
    assert "unchanged" in log or "failed" in log
    with env.store() as store:
        assert store.version() == version
        np.testing.assert_array_equal(store.pull("user_id", users).weights, rows_before)

    code, outcome, log = train(env)
    assert code == 0, log[-4000:]
    assert outcome["status"] == "trained"
    assert _manifest(env, outcome["run_id"])["read"]["samples"] == len(synthetic.samples)
    with env.store() as store:
        assert store.version() == version
        np.testing.assert_array_equal(store.pull("user_id", users).weights, rows_before)
        assert not np.array_equal(store.stage(outcome["ps_stage"]).pull("user_id", users).weights, rows_before)
    # the killed job's run never committed: the runs that did are the ones consumed
    committed = client.search_runs(
        [run.info.experiment_id for run in [client.get_run(outcome["run_id"])]], "tags.recsys_committed = 'true'"
    )
    assert outcome["run_id"] in {r.info.run_id for r in committed}
