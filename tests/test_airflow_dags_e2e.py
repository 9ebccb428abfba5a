"""`airflow dags test` of both DAGs against real Kafka, Redis (Feast online store, parameter
service) and MLflow (SQLite), with a fresh Airflow metadata DB in a temporary run directory."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest

from recsys import airflow_local
from recsys.services import free_port
from recsys.settings import PROJECT_ROOT, Settings

pytestmark = [pytest.mark.slow, pytest.mark.integration]

sys.path.insert(0, str(PROJECT_ROOT / "dags"))  # recsys_ops, the DAGs' helpers


def recsys_env(s: Settings) -> dict[str, str]:
    """The settings as RECSYS_* variables, for the Airflow processes and the tasks they run."""
    import json

    env = {}
    for name, value in s.model_dump().items():
        if value is None:
            continue
        env[f"RECSYS_{name.upper()}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return env


def dags_test(s: Settings, dag_id: str, conf: str | None = None,
              extra_env: dict[str, str] | None = None) -> tuple[str, dict[str, str], str]:
    """Run one `airflow dags test`; returns the run's state, its task states and the output."""
    env = {**airflow_local.airflow_env(s), **recsys_env(s), **(extra_env or {})}
    cmd = airflow_local.airflow_cmd("dags", "test", dag_id, *(["-c", conf] if conf else []))
    done = subprocess.run(cmd, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=480)
    output = done.stdout + done.stderr
    db = sqlite3.connect(airflow_local.layout(s).db)
    try:
        run_id, state = db.execute("SELECT run_id, state FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1",
                                   (dag_id,)).fetchone()
        tasks = dict(db.execute("SELECT task_id || COALESCE('[' || NULLIF(map_index, -1) || ']', ''), state "
                                "FROM task_instance WHERE dag_id = ? AND run_id = ?", (dag_id, run_id)).fetchall())
    finally:
        db.close()
    return state, tasks, output


@pytest.fixture(scope="module")
def airflow_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated Airflow metadata DB for the module (the DAGs' runs do not interfere)."""
    run_dir = tmp_path_factory.mktemp("airflow-e2e")
    airflow_local.migrate(Settings(run_dir=run_dir))
    return run_dir


@pytest.fixture
def airflow_settings(kafka_bootstrap: str, redis_factory: Callable, airflow_run_dir: Path, tmp_path: Path) -> Settings:
    import uuid

    tag = uuid.uuid4().hex[:8]
    feast_redis = redis_factory("feast")
    shard, replica = redis_factory(f"ps-shard-{tag}"), redis_factory(f"ps-replica-{tag}")
    s = Settings(
        kafka_bootstrap=kafka_bootstrap, redis_url=feast_redis.url, ps_shards=[shard.url], ps_replicas=[replica.url],
        topic_events=f"events.{tag}", topic_samples=f"samples.{tag}", topic_deadletter=f"dead.{tag}",
        topic_late=f"late.{tag}", run_dir=airflow_run_dir, cache_dir=PROJECT_ROOT / ".cache",
        mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", feast_data_dir=tmp_path / "feast",
        feast_online_store="redis", feast_redis_url=feast_redis.url, train_experiment=f"airflow-e2e-{tag}",
        train_model_name=f"recsys-e2e-{tag}", serving_model_name=f"recsys-e2e-{tag}",
        serving_reload_urls=["http://127.0.0.1:9"], publish_timeout_s=60.0, train_epochs=1,
        airflow_port=free_port(),
    )
    return s


def test_features_dag_materializes_and_compacts(airflow_settings: Settings) -> None:
    from feature_repo.spec import encode_item, encode_user
    from feature_repo.store import open_store, read_online, rows_frame, write_offline

    s = airflow_settings
    now = time.time()
    users = [encode_user(f"u{i}", {"gender": "F" if i % 2 else "M", "age": 25, "occupation": "writer",
                                   "zip_code": "10001"}) for i in range(6)]
    items = [encode_item(f"i{i}", {"genres": ["Drama"], "year": 1999, "title": f"t{i}"}) for i in range(4)]
    # the stream worker's way of writing the offline store: many small files
    for i in range(3):
        write_offline(s.feast_data_dir, "user", rows_frame("user", users[2 * i:2 * i + 2], [now - 60 + i] * 2))
    for i in range(2):
        write_offline(s.feast_data_dir, "item", rows_frame("item", items[2 * i:2 * i + 2], [now - 60 + i] * 2))
    state, tasks, output = dags_test(s, "recsys_features")
    assert state == "success", output[-4000:]
    assert set(tasks.values()) == {"success"}, tasks

    store = open_store(s.feast_data_dir, "redis", s.feast_redis_url, apply=False)
    online = read_online(store, "user", [f"u{i}" for i in range(6)])
    assert all(online[f"u{i}"] is not None and online[f"u{i}"].sparse == users[i].sparse for i in range(6)), online
    assert read_online(store, "item", ["i3"])["i3"].sparse == items[3].sparse
    for entity, rows in (("user", 6), ("item", 4)):
        files = list((s.feast_data_dir / "offline" / entity).rglob("*.parquet"))
        assert len(files) == 1 and files[0].name.startswith("part-compacted-"), files


def test_training_dag_skips_cleanly_without_new_samples(airflow_settings: Settings) -> None:
    from recsys.kafka import ensure_topics
    import asyncio

    s = airflow_settings
    asyncio.run(ensure_topics(s.kafka_bootstrap, {s.topic_samples: 2}))
    state, tasks, output = dags_test(s, "recsys_training")
    assert state == "success", output[-4000:]
    assert tasks["check_new_samples"] == "success"
    assert {t: st for t, st in tasks.items() if t != "check_new_samples"} == {
        t: "skipped" for t in ("train", "evaluate", "gate", "promote", "publish", "reload_serving")}, tasks


def _xcom(s: Settings, dag_id: str, task_id: str) -> object:
    import json

    db = sqlite3.connect(airflow_local.layout(s).db)
    try:
        (value,) = db.execute("SELECT value FROM xcom WHERE dag_id = ? AND task_id = ? AND key = 'return_value' "
                              "ORDER BY dag_run_id DESC LIMIT 1", (dag_id, task_id)).fetchone()
    finally:
        db.close()
    return json.loads(value) if isinstance(value, (str, bytes)) else value


def test_training_dag_trains_promotes_publishes_and_refuses_a_forced_worse_challenger(
        airflow_settings: Settings, tmp_path: Path) -> None:
    """Run 1 trains the first champion, publishes it to the inference replica and asks serving to
    reload; run 2 trains a challenger forced to be worse (learning rates ~0: it keeps its random
    dense part), which the gate refuses after scoring both on run 2's evaluation set."""
    import json
    import os

    from paramserver.replication import replica_status
    from recsys.simulator import SimConfig
    from recsys_ops.gate import TAG_GATE, champion_version, client_for
    from training.synthetic import produce_samples, simulate_samples

    s = airflow_settings
    replicator = subprocess.Popen([sys.executable, "-m", "paramserver.cli", "replicate", "--replica", s.ps_replicas[0]],
                                  env={**os.environ, **recsys_env(s)}, cwd=PROJECT_ROOT,
                                  stdout=open(tmp_path / "replicator.log", "wb"), stderr=subprocess.STDOUT)
    try:
        start = time.time() - 7200
        for batch in range(2):
            synthetic = simulate_samples(SimConfig(users=300, items=150, requests=500, seed=batch,
                                                   start_time=start + batch * 1800))
            produce_samples(s.kafka_bootstrap, s.topic_samples, synthetic.samples)
            forced = {} if batch == 0 else {"RECSYS_TRAIN_DENSE_LR": "1e-9", "RECSYS_TRAIN_EMBEDDING_LR": "1e-9",
                                            "RECSYS_TRAIN_SEED": "11"}
            state, tasks, output = dags_test(s, "recsys_training", conf=json.dumps({"epochs": 2}), extra_env=forced)
            assert state == "success", output[-6000:]
            client = client_for(s.mlflow_tracking_uri)
            trained = _xcom(s, "recsys_training", "train")
            version = trained["model_version"]
            if batch == 0:
                assert set(tasks.values()) == {"success"}, tasks
                assert champion_version(client, s.train_model_name) == version
                published = _xcom(s, "recsys_training", "publish")
                assert published["ps_version"] == trained["ps_version"]
                status = replica_status(None, [s.ps_replicas[0]], namespace=s.ps_namespace)
                assert status["version"] >= trained["ps_version"]
                assert _xcom(s, "recsys_training", "reload_serving") == {"http://127.0.0.1:9": "not running"}
                first = version
            else:
                assert tasks["gate"] == "success" and tasks["evaluate"] == "success", tasks
                assert {tasks[t] for t in ("promote", "publish", "reload_serving")} == {"skipped"}, tasks
                evaluation = _xcom(s, "recsys_training", "evaluate")
                print(f"forced worse challenger v{version}: {evaluation}")
                assert evaluation["champion_version"] == first
                assert evaluation["challenger_auc_same_rows"] < evaluation["champion_auc"] - s.gate_tolerance
                assert champion_version(client, s.train_model_name) == first
                assert client.get_model_version(s.train_model_name, version).tags[TAG_GATE] == "refused"
    finally:
        replicator.terminate()
        replicator.wait(timeout=30)
