"""`airflow dags test` of both DAGs against real Kafka, Redis (Feast online store, parameter
service) and MLflow (SQLite), with a fresh Airflow metadata DB in a temporary run directory.
After the training runs, `mlflow server` on their store and headless chromium check what MLflow's
own UI shows of them (screenshots to docs/)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from core.procs import free_port
from core.settings import PROJECT_ROOT, Settings
from local_services import airflow as airflow_local
from local_services import services
from tests.browser.harness import DOCS, require_browser, run_script

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MLFLOW_UI = "mlflow-ui-test"  # the managed service name of the MLflow server the UI check opens


def recsys_env(s: Settings) -> dict[str, str]:
    """The settings as RECSYS_* variables, for the Airflow processes and the tasks they run."""
    import json

    from core.settings import SECTIONS, env_name

    env = {}
    for name, section in SECTIONS.items():
        for field_name, value in getattr(s, name).model_dump(mode="json").items():
            if value is not None:
                env[env_name(section, field_name)] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return env


def dags_test(
    s: Settings, dag_id: str, conf: str | None = None, extra_env: dict[str, str] | None = None
) -> tuple[str, dict[str, str], str]:
    """Run one `airflow dags test`; returns the run's state, its task states and the output."""
    env = {**airflow_local.airflow_env(s), **recsys_env(s), **(extra_env or {})}
    cmd = airflow_local.airflow_cmd("dags", "test", dag_id, *(["-c", conf] if conf else []))
    done = subprocess.run(cmd, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=480)
    output = done.stdout + done.stderr
    db = sqlite3.connect(airflow_local.layout(s).db)
    try:
        run_id, state = db.execute(
            "SELECT run_id, state FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", (dag_id,)
        ).fetchone()
        tasks = dict(
            db.execute(
                "SELECT task_id || COALESCE('[' || NULLIF(map_index, -1) || ']', ''), state "
                "FROM task_instance WHERE dag_id = ? AND run_id = ?",
                (dag_id, run_id),
            ).fetchall()
        )
    finally:
        db.close()
    return state, tasks, output


def _mlflow_store(run_dir: Path) -> Path:
    """The SQLite store `services.start_mlflow(run_dir, ...)` serves."""
    (run_dir / "mlflow").mkdir(parents=True, exist_ok=True)
    return run_dir / "mlflow" / "mlflow.db"


@pytest.fixture(scope="module")
def airflow_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated Airflow metadata DB for the module (the DAGs' runs do not interfere)."""
    run_dir = tmp_path_factory.mktemp("airflow-e2e")
    airflow_local.migrate(Settings().override(local={"run_dir": run_dir}))
    return run_dir


@pytest.fixture
def airflow_settings(kafka_bootstrap: str, redis_factory: Callable, airflow_run_dir: Path, tmp_path: Path) -> Settings:
    import uuid

    tag = uuid.uuid4().hex[:8]
    feast_redis = redis_factory("feast")
    shard, replica = redis_factory(f"ps-shard-{tag}"), redis_factory(f"ps-replica-{tag}")
    s = Settings().override(
        kafka={
            "bootstrap": kafka_bootstrap,
            "topic_events": f"events.{tag}",
            "topic_samples": f"samples.{tag}",
            "topic_deadletter": f"dead.{tag}",
            "topic_late": f"late.{tag}",
        },
        local={"redis_url": feast_redis.url, "run_dir": airflow_run_dir, "cache_dir": PROJECT_ROOT / ".cache"},
        ps={"shards": [shard.url], "replicas": [replica.url]},
        # no MLflow server while the DAGs run: the UI address is only the base of the run links the task
        # logs. The store sits where `start_mlflow(tmp_path, ...)` serves it from, for the UI check after
        mlflow={"tracking_uri": f"sqlite:///{_mlflow_store(tmp_path)}", "ui_url": "http://127.0.0.1:5999"},
        feast={"data_dir": tmp_path / "feast", "online_store": "redis", "redis_url": feast_redis.url},
        train={"experiment": f"airflow-e2e-{tag}", "model_name": f"recsys-e2e-{tag}", "epochs": 1},
        serving={"model_name": f"recsys-e2e-{tag}", "reload_urls": ["http://127.0.0.1:9"]},
        gate={"publish_timeout_s": 60.0, "min_new_samples": 1},
        airflow={"port": free_port()},
    )
    return s


def test_features_dag_materializes_and_compacts(airflow_settings: Settings) -> None:
    from feature_repo.spec import encode_item, encode_user
    from feature_repo.store import open_store, read_online, rows_frame, write_offline

    s = airflow_settings
    now = time.time()
    users = [
        encode_user(f"u{i}", {"gender": "F" if i % 2 else "M", "age": 25, "occupation": "writer", "zip_code": "10001"})
        for i in range(6)
    ]
    items = [encode_item(f"i{i}", {"genres": ["Drama"], "year": 1999, "title": f"t{i}"}) for i in range(4)]
    # the stream worker's way of writing the offline store: many small files
    for i in range(3):
        write_offline(s.feast.data_dir, "user", rows_frame("user", users[2 * i : 2 * i + 2], [now - 60 + i] * 2))
    for i in range(2):
        write_offline(s.feast.data_dir, "item", rows_frame("item", items[2 * i : 2 * i + 2], [now - 60 + i] * 2))
    state, tasks, output = dags_test(s, "recsys_features")
    assert state == "success", output[-4000:]
    assert set(tasks.values()) == {"success"}, tasks

    store = open_store(s.feast.data_dir, "redis", s.feast_redis_url, apply=False)
    online = read_online(store, "user", [f"u{i}" for i in range(6)])
    assert all(online[f"u{i}"] is not None and online[f"u{i}"].sparse == users[i].sparse for i in range(6)), online
    assert read_online(store, "item", ["i3"])["i3"].sparse == items[3].sparse
    for entity in ("user", "item"):
        files = list((s.feast.data_dir / "offline" / entity).rglob("*.parquet"))
        assert len(files) == 1 and files[0].name.startswith("part-compacted-"), files


def _xcom(s: Settings, dag_id: str, task_id: str) -> object:
    import json

    db = sqlite3.connect(airflow_local.layout(s).db)
    try:
        (value,) = db.execute(
            "SELECT value FROM xcom WHERE dag_id = ? AND task_id = ? AND key = 'return_value' "
            "ORDER BY dag_run_id DESC LIMIT 1",
            (dag_id, task_id),
        ).fetchone()
    finally:
        db.close()
    return json.loads(value) if isinstance(value, (str, bytes)) else value


def _task_log(output: str, task_id: str) -> str:
    """The records the task logged, from `airflow dags test`'s output.

    `dags test` runs each task in its own process (no log file under the logs folder): its log
    records go to the command's output, from "[DAG TEST] starting task_id=<task>" to the next task's.
    """
    marker = "[DAG TEST] starting task_id="
    start = output.find(f"{marker}{task_id} ")
    assert start >= 0, f"no {marker}{task_id} in the output:\n{output[-4000:]}"
    end = output.find(marker, start + len(marker))
    return output[start : end if end >= 0 else len(output)]


def _last_run_id(s: Settings, dag_id: str) -> str:
    db = sqlite3.connect(airflow_local.layout(s).db)
    try:
        (run_id,) = db.execute(
            "SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", (dag_id,)
        ).fetchone()
    finally:
        db.close()
    return str(run_id)


def _stages(s: Settings) -> list[str]:
    from paramserver import open_store

    store = open_store("redis", [], s.ps)
    try:
        return store.stages()
    finally:
        store.close()


# three training runs (~3-4 min on an idle 2-core machine, far more under load), then the MLflow UI check
@pytest.mark.timeout(2100)
def test_training_dag_promotes_a_better_challenger_and_refuses_a_forced_worse_one(
    airflow_settings: Settings, tmp_path: Path
) -> None:
    """Three runs, each on a new batch of samples. A challenger is forced to be worse by learning
    rates of ~0 (it keeps its random dense part). Run 1 (forced worse) becomes the first champion,
    is published to the inference replica and serving is asked to reload; run 2 (trained normally)
    beats it on run 2's evaluation set and is promoted; run 3 (forced worse) is refused."""
    import json
    import os
    from urllib.parse import quote

    from paramserver.replication import replica_status
    from traffic.simulator import SimConfig
    from traffic.synthetic import produce_samples, simulate_samples
    from training.lifecycle.gate import TAG_GATE, champion_version, client_for
    from training.tracking import TAG_AIRFLOW_DAG_ID, TAG_AIRFLOW_RUN_ID, TAG_AIRFLOW_URL

    s = airflow_settings
    forced = {"RECSYS_TRAIN_DENSE_LR": "1e-9", "RECSYS_TRAIN_EMBEDDING_LR": "1e-9", "RECSYS_TRAIN_SEED": "11"}
    replicator = subprocess.Popen(
        [sys.executable, "-m", "paramserver.cli", "replicate", "--replica", s.ps.replicas[0]],
        env={**os.environ, **recsys_env(s)},
        cwd=PROJECT_ROOT,
        stdout=open(tmp_path / "replicator.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    client = client_for(s.mlflow.tracking_uri)
    versions = []
    try:
        # one simulated world, its traffic cut by time into three batches: each run sees new
        # impressions of the same users and items, so what a champion learned carries over
        synthetic = simulate_samples(
            SimConfig(users=150, items=80, requests=900, seed=3, affinity_scale=3.0, start_time=time.time() - 7200)
        )
        ordered = sorted(synthetic.samples, key=lambda sample: sample.event_time)
        third = len(ordered) // 3
        for batch in range(3):
            produce_samples(s.kafka.bootstrap, s.kafka.topic_samples, ordered[batch * third : (batch + 1) * third])
            state, tasks, output = dags_test(
                s, "recsys_training", conf=json.dumps({"epochs": 1}), extra_env=forced if batch in (0, 2) else None
            )
            assert state == "success", output[-6000:]
            trained = _xcom(s, "recsys_training", "train")
            versions.append(trained["model_version"])
            dag_run_id = _last_run_id(s, "recsys_training")
            run = client.get_run(trained["run_id"])
            # the MLflow run names the DAG run that made it, and links back to it
            assert run.info.run_name == dag_run_id, run.info.run_name
            assert run.data.tags[TAG_AIRFLOW_RUN_ID] == dag_run_id
            assert run.data.tags[TAG_AIRFLOW_DAG_ID] == "recsys_training"
            assert f"/dags/recsys_training/runs/{quote(dag_run_id)}/tasks/train" in run.data.tags[TAG_AIRFLOW_URL]
            # ... and the train task's log leads with the training summary and the run's MLflow URL
            url = f"{s.mlflow.ui_url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
            log = _task_log(output, "train")
            summary = [
                line for line in log.splitlines() if f"trained {s.train.model_name} v{trained['model_version']}" in line
            ]
            assert summary, log[-4000:]
            assert "samples" in summary[0] and "epochs" in summary[0] and "rows staged" in summary[0], summary
            assert ("eval AUC" in summary[0]) or ("no eval AUC" in summary[0]), summary
            assert url in summary[0] and f"MLflow run: {url}" in log, log[-4000:]
            # no library advice to its own developers: deprecations, TorchRec's planner, torch.fx
            for noise in ("DeprecationWarning", "DeprecatedImportWarning", "FutureWarning", "WARNING:torchrec"):
                assert noise not in log, log[-4000:]
            assert "is_fx_tracing" not in log, log[-4000:]
            if batch == 0:
                print(log[-6000:])
            # the window is the run's dataset input
            (window,) = [d.dataset for d in run.inputs.dataset_inputs]
            assert window.source_type == "kafka" and json.loads(window.source)["topic"] == s.kafka.topic_samples
            evaluation = _xcom(s, "recsys_training", "evaluate")
            print(f"run {batch + 1}: v{trained['model_version']} {evaluation}")
            if batch < 2:  # promoted: the first champion, then the better challenger
                assert set(tasks.values()) == {"success"}, tasks
                assert champion_version(client, s.train.model_name) == trained["model_version"]
                # the champion's rows were staged by its job and promoted with it: publication waited for them
                promoted = _xcom(s, "recsys_training", "promote")
                assert promoted["ps_version"] is not None
                assert _xcom(s, "recsys_training", "publish")["ps_version"] == promoted["ps_version"]
                status = replica_status(None, [s.ps.replicas[0]], namespace=s.ps.namespace)
                assert status["version"] >= promoted["ps_version"]
                served_version = status["version"]
                assert _xcom(s, "recsys_training", "reload_serving") == {"http://127.0.0.1:9": "not running"}
            if batch == 0:
                assert evaluation["champion_version"] is None
            if batch == 1:
                assert evaluation["champion_version"] == versions[0]
                assert evaluation["challenger_auc_rescored"] > evaluation["champion_auc"]
            if batch == 2:
                assert tasks["evaluate"] == "success" and tasks["gate"] == "success", tasks
                assert {tasks[t] for t in ("promote", "publish", "reload_serving")} == {"skipped"}, tasks
                assert evaluation["champion_version"] == versions[1]
                assert evaluation["challenger_auc_rescored"] < evaluation["champion_auc"] - s.gate.tolerance
                assert champion_version(client, s.train.model_name) == versions[1]
                assert client.get_model_version(s.train.model_name, versions[2]).tags[TAG_GATE] == "refused"
                # the verdict and why, on the model page
                assert "Gate: **refused**" in client.get_model_version(s.train.model_name, versions[2]).description
                # the refused challenger's rows never reached the parameter service nor its replica
                assert client.get_model_version(s.train.model_name, versions[2]).tags["ps_stage_dropped"] == "true"
                assert trained["ps_stage"] not in _stages(s)
                time.sleep(1.0)  # a replicator would have copied a pushed version by now
                status = replica_status(None, [s.ps.replicas[0]], namespace=s.ps.namespace)
                assert status["version"] == served_version
        assert client.get_model_version(s.train.model_name, versions[0]).tags["role"] == "retired"
        assert "Retired" in client.get_model_version(s.train.model_name, versions[0]).description
        # the experiment opens in MLflow's model-training view, not the GenAI one
        experiment = client.get_experiment_by_name(s.train.experiment)
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        # after the runs, not beside them: the server would compete with the DAG runs for the CPU (it took
        # ~3 min to start at load ~25)
        ui_port = free_port()
        services.start_mlflow(tmp_path, ui_port, name=MLFLOW_UI, timeout=900)
        _look_in_the_mlflow_ui(s, f"http://127.0.0.1:{ui_port}", client, champion=versions[1], refused=versions[2])
    finally:
        services.stop(tmp_path, MLFLOW_UI)
        replicator.terminate()
        replicator.wait(timeout=30)


def _look_in_the_mlflow_ui(s: Settings, base: str, client: object, champion: str, refused: str) -> None:
    """MLflow's own UI (``base``) on this test's store, as an operator opens it from a task log: the champion's
    run page (model-training view) names the DAG run that made it and shows its metrics and Airflow tags; the
    model page shows the aliases; the refused version's page gives the gate's verdict. Screenshots to docs/."""
    import json
    import os

    from training.tracking import TAG_AIRFLOW_RUN_ID, run_url

    require_browser()
    name = s.train.model_name
    run = client.get_run(client.get_model_version(name, champion).run_id)  # type: ignore[attr-defined]
    DOCS.mkdir(exist_ok=True)
    pages = [
        {
            "url": run_url(base, run.info.experiment_id, run.info.run_id),
            "texts": [run.info.run_name, TAG_AIRFLOW_RUN_ID, "eval_auc", "loss"],
            "screenshot": str(DOCS / "mlflow-run.png"),
            "height": 1600,  # the run page scrolls inside its own panel: its metrics are below the first screen
        },
        {
            "url": f"{base}/#/models/{name}",
            "texts": [name, "champion", "challenger"],
            "screenshot": str(DOCS / "mlflow-model.png"),
        },
        {
            "url": f"{base}/#/models/{name}/versions/{refused}",
            "texts": ["Gate:", "refused"],
            "screenshot": str(DOCS / "mlflow-model-version.png"),
        },
    ]
    seen = run_script("pages.mjs", {**os.environ, "PAGES": json.dumps(pages), "TIMEOUT_S": "180"}, timeout=900)
    print(seen.stderr[-3000:])
    assert seen.returncode == 0 and "error" not in seen.result, (seen.result, seen.stderr[-3000:])
    assert seen.result["requests_off_machine"] == [], seen.result["requests_off_machine"]
    for page in seen.result["pages"]:
        assert page["missing"] == [], page
        assert Path(page["screenshot"]).stat().st_size > 10_000, page
