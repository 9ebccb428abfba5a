"""Password-protected parameter service (README "Deploying safely"): `recsys ps up` starts its Redis servers
requiring the credentials of their URLs (a password; an ACL user), and every client of ours passes them:
redis-py, the raw RESP connections, the replicator (started by `ps up`), serving's failover reader. No
status output or error message shows a password. Real redis-server processes on 127.0.0.1."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from local_services import services
from paramserver import Rows, ShardUnavailable, TableConfig, open_reader
from paramserver.redis_store import RedisStore
from paramserver.replication import replica_status
from paramserver.resp import RespConnection, pack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USER = TableConfig("user", dim=8, state_dim=1, seed=3, capacity=20_000)
SHARD_PASSWORD = "shard-secret-1"
REPLICA_PASSWORD = "replica-secret-2"


@pytest.fixture
def protected_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> dict[str, str]:
    from core.settings import get_settings

    shard_port, replica_port = services.free_port(), services.free_port()
    urls = {
        # an ACL user on the training copy, Redis' default user with a password on the replica
        "shard": f"redis://ps-writer:{SHARD_PASSWORD}@127.0.0.1:{shard_port}/0",
        "replica": f"redis://:{REPLICA_PASSWORD}@127.0.0.1:{replica_port}/0",
    }
    monkeypatch.setenv("RECSYS_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("RECSYS_PS_SHARDS", json.dumps([urls["shard"]]))
    monkeypatch.setenv("RECSYS_PS_REPLICAS", json.dumps([urls["replica"]]))
    get_settings.cache_clear()
    yield urls
    get_settings.cache_clear()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def test_ps_up_protects_the_servers_and_every_client_authenticates(protected_env: dict[str, str]) -> None:
    from typer.testing import CliRunner

    from core.settings import get_settings
    from recsys.cli import app

    runner = CliRunner()
    shard, replica = protected_env["shard"], protected_env["replica"]
    try:
        result = runner.invoke(app, ["ps", "up"])
        assert result.exit_code == 0, result.output
        # without credentials the servers refuse; with the URL's they answer
        assert not services.redis_ping(_port(shard)) and not services.redis_ping(_port(replica))
        assert services.redis_ping(_port(shard), services.RedisAuth(SHARD_PASSWORD, "ps-writer"))
        assert services.redis_ping(_port(replica), services.RedisAuth(REPLICA_PASSWORD))

        ids = np.arange(50, dtype=np.int64)
        with RedisStore([shard], [USER]) as store:  # redis-py (setup, scripts) and RESP (rows) both log in
            store.push({"user": Rows(ids, np.full((50, 8), 2.0, np.float32), np.ones((50, 1), np.float32))})
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # the replicator `up` started (by index) catches up
                if replica_status(store, [replica]).get("version") == 1:
                    break
                time.sleep(0.1)
            assert replica_status(store, [replica])["version"] == 1

        reader = open_reader(get_settings().ps, tables=[USER])  # serving's reader, on the replica
        try:
            rows = reader.pull("user", ids)
            assert np.allclose(rows.weights, 2.0) and rows.version == 1
        finally:
            reader.close()

        result = runner.invoke(app, ["ps", "status", "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["replicas"][0]["version"] == 1
        for command in (["ps", "status", "--json"], ["ps", "status"], ["services", "status"]):
            shown = runner.invoke(app, command).output
            assert SHARD_PASSWORD not in shown and REPLICA_PASSWORD not in shown, command
        pid_files = (get_settings().local.run_dir / "pids").glob("*.pid")
        for pid_file in pid_files:  # nor is any password on a command line we recorded
            text = pid_file.read_text()
            assert SHARD_PASSWORD not in text and REPLICA_PASSWORD not in text, pid_file.name
    finally:
        result = runner.invoke(app, ["ps", "down"])
    assert result.exit_code == 0, result.output


def test_a_wrong_password_is_refused_without_showing_it(tmp_path) -> None:
    port = services.free_port()
    services.start_redis(tmp_path, port, name="auth-test", auth=services.RedisAuth("right-password-3"))
    try:
        good = RespConnection(f"redis://:right-password-3@127.0.0.1:{port}/0", timeout=2.0)
        assert good.call(pack(b"PING"), 1) == [b"PONG"]
        good.close()
        bad = RespConnection(f"redis://:wrong-password-4@127.0.0.1:{port}/0", timeout=2.0)
        with pytest.raises(ShardUnavailable) as refused:
            bad.call(pack(b"PING"), 1)
        assert "wrong-password-4" not in str(refused.value) and "***" in str(refused.value)
    finally:
        services.stop(tmp_path, "auth-test")
