"""`recsys services up|down|status` on free ports: real processes, idempotent, stops only its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from core.settings import PROJECT_ROOT
from local_services import services

pytestmark = pytest.mark.integration


def recsys(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recsys.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=PROJECT_ROOT,
    )


@pytest.fixture
def service_env(tmp_path: Path) -> dict[str, str]:
    kafka_port = services.free_port()
    return {
        **os.environ,
        "RECSYS_RUN_DIR": str(tmp_path / "run"),
        "RECSYS_KAFKA_PORT": str(kafka_port),
        "RECSYS_KAFKA_CONTROLLER_PORT": str(services.free_port()),
        "RECSYS_REDIS_PORT": str(services.free_port()),
        "RECSYS_KAFKA_BOOTSTRAP": f"127.0.0.1:{kafka_port}",
        "RECSYS_PROMETHEUS_PORT": str(services.free_port()),
        "RECSYS_LOOP_EXPORTER_PORT": str(services.free_port()),
        "COLUMNS": "200",
    }


@pytest.mark.slow
def test_up_is_idempotent_status_reports_and_down_stops_everything(service_env: dict[str, str]) -> None:
    run_dir = Path(service_env["RECSYS_RUN_DIR"])
    try:
        first = recsys("services", "up", env=service_env)
        assert first.returncode == 0, first.stderr
        pids = {entry.name: entry.pid for entry in services.status(run_dir)}
        assert set(pids) == {"kafka", "redis", "loop-exporter", "prometheus"}
        assert "recsys.events" in first.stderr  # topics were created
        dashboard = f"http://127.0.0.1:{service_env['RECSYS_PROMETHEUS_PORT']}/consoles/loop.html"
        assert f"loop dashboard: {dashboard}" in first.stdout
        assert services.http_ok(dashboard)

        again = recsys("services", "up", env=service_env)
        assert again.returncode == 0, again.stderr
        again_pids = {entry.name: entry.pid for entry in services.status(run_dir)}
        # nothing restarted but the stateless loop exporter, which takes the settings of the latest `up`
        assert {k: v for k, v in again_pids.items() if k != "loop-exporter"} == {
            k: v for k, v in pids.items() if k != "loop-exporter"
        }
        pids = again_pids

        status = recsys("services", "status", env=service_env)
        assert status.stdout.count("running") == 4

        client = redis.Redis(port=int(service_env["RECSYS_REDIS_PORT"]))
        assert client.set("k", b"v") and client.get("k") == b"v"
        assert client.config_get("save")["save"] == ""  # no persistence for tests
    finally:
        down = recsys("services", "down", env=service_env)
    assert down.returncode == 0, down.stderr
    assert "kafka: stopped" in down.stderr and "redis: stopped" in down.stderr
    assert "prometheus: stopped" in down.stderr and "loop-exporter: stopped" in down.stderr
    assert not any(entry.running for entry in services.status(run_dir))
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_stop_never_kills_a_process_that_reused_the_pid(tmp_path: Path) -> None:
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "pids").mkdir()
        (tmp_path / "pids" / "redis.pid").write_text(
            json.dumps({"pid": stranger.pid, "port": 1, "marker": "redis-server 127.0.0.1:1", "cmd": [], "started": 0})
        )
        assert services.stop(tmp_path, "redis") is False
        time.sleep(0.2)
        assert stranger.poll() is None
        assert not (tmp_path / "pids" / "redis.pid").exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_a_port_taken_by_someone_else_is_reported(tmp_path: Path, redis_server) -> None:
    with pytest.raises(services.ServiceError, match="already taken"):
        services.start_redis(tmp_path, redis_server.port, name="intruder")


def test_redis_fixture_is_real(redis_server) -> None:
    client = redis.Redis(port=redis_server.port)
    client.hset("h", mapping={"a": 1})
    assert client.hgetall("h") == {b"a": b"1"}
    assert "redis_version" in client.info("server")
