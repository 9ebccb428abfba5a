"""The local Airflow's configuration: loopback only, shared secrets, a password generated once."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from core.settings import Settings
from local_services import airflow as airflow_local


def test_env_binds_loopback_and_shares_a_long_jwt_secret(tmp_path: Path) -> None:
    s = Settings().override(local={"run_dir": tmp_path}, airflow={"port": 18123})
    env = airflow_local.airflow_env(s)
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18123/execution/"
    assert env["AIRFLOW_HOME"] == str(tmp_path.resolve() / "airflow")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == f"sqlite:///{tmp_path.resolve() / 'airflow' / 'airflow.db'}"
    assert len(env["AIRFLOW__API_AUTH__JWT_SECRET"].encode()) >= 64
    # every service (and every later `up`) gets the same secret
    assert airflow_local.airflow_env(s)["AIRFLOW__API_AUTH__JWT_SECRET"] == env["AIRFLOW__API_AUTH__JWT_SECRET"]
    secrets_file = airflow_local.layout(s).secrets_file
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    # the scheduler and triggerer must not open their 0.0.0.0 log servers
    for component in ("scheduler", "triggerer"):
        assert "--skip-serve-logs" in airflow_local._component_cmd(s, component)  # noqa: SLF001
    assert "127.0.0.1" in airflow_local._component_cmd(s, "api-server")  # noqa: SLF001


def test_postgres_url_is_passed_through(tmp_path: Path) -> None:
    s = Settings().override(
        local={"run_dir": tmp_path},
        airflow={"db_url": "postgresql+psycopg2://airflow@127.0.0.1:5432/airflow"},
    )
    assert airflow_local.airflow_env(s)["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")


def test_admin_password_generated_once(tmp_path: Path) -> None:
    s = Settings().override(local={"run_dir": tmp_path})
    password, new = airflow_local.ensure_admin_password(s)
    assert new and len(password) >= 12
    again, new_again = airflow_local.ensure_admin_password(s)
    assert (again, new_again) == (password, False)
    path = airflow_local.layout(s).passwords_file
    assert json.loads(path.read_text()) == {"admin": password}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
