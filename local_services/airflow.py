"""A local Airflow 3 deployment for the project's DAGs: api-server, scheduler, dag-processor, triggerer.

Everything lives under ``<run_dir>/airflow`` (AIRFLOW_HOME): the SQLite metadata DB (unless
``RECSYS_AIRFLOW_DB_URL`` names another database, e.g. PostgreSQL), task logs, the generated
secrets and the admin password of the simple auth manager. Every service binds to 127.0.0.1:
the services are started one by one rather than with ``airflow standalone`` (which binds its
log servers to 0.0.0.0); the scheduler and triggerer skip their log servers because the
api-server reads task logs from the same local folder.

The processes are tracked with the PID files of ``local_services.services`` (same run directory), so
``recsys airflow down`` stops exactly what ``up`` started. Backs ``recsys airflow up|down|status``
and the tests. Airflow itself is imported only by the child processes, never here.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from core.settings import PROJECT_ROOT, Settings
from local_services import services

ADMIN_USER = "admin"
# start order: the api-server first (the others report to its execution API), scheduler last
COMPONENTS = ("api-server", "dag-processor", "triggerer", "scheduler")
HEALTH_KEYS = {"scheduler": "scheduler", "dag-processor": "dag_processor", "triggerer": "triggerer"}


class AirflowError(RuntimeError):
    """Local Airflow could not be initialised, started or reached."""


@dataclass(frozen=True)
class AirflowLayout:
    home: Path

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def db(self) -> Path:
        return self.home / "airflow.db"

    @property
    def secrets_file(self) -> Path:
        return self.home / "secrets.json"

    @property
    def passwords_file(self) -> Path:
        return self.home / "simple_auth_manager_passwords.json"

    def pid_arg(self, component: str) -> Path:
        # passed as --pid: puts this run directory into the command line, which guards PID reuse
        return self.home / "pids" / f"{component}.pid"


def layout(settings: Settings) -> AirflowLayout:
    return AirflowLayout(settings.local.run_dir.resolve() / "airflow")


def base_url(settings: Settings) -> str:
    return f"http://{services.LOCALHOST}:{settings.airflow.port}"


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def _secrets(paths: AirflowLayout) -> dict[str, str]:
    """JWT secret (>= 64 bytes, shared by every service), session secret key, Fernet key: made once."""
    try:
        return json.loads(paths.secrets_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    import base64

    values = {
        "jwt_secret": secrets.token_urlsafe(64),
        "secret_key": secrets.token_urlsafe(32),
        "fernet_key": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
    }
    _write_private(paths.secrets_file, json.dumps(values))
    return values


def ensure_admin_password(settings: Settings) -> tuple[str, bool]:
    """The admin password of the simple auth manager and whether it was generated just now."""
    paths = layout(settings)
    try:
        known = json.loads(paths.passwords_file.read_text())
        if isinstance(known, dict) and known.get(ADMIN_USER):
            return str(known[ADMIN_USER]), False
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    password = secrets.token_urlsafe(12)
    _write_private(paths.passwords_file, json.dumps({ADMIN_USER: password}) + "\n")
    return password, True


def airflow_env(settings: Settings, dags_folder: Path | None = None) -> dict[str, str]:
    """The environment of every Airflow process (services, `airflow dags test`): this process's own plus config."""
    paths = layout(settings)
    keys = _secrets(paths)
    db_url = settings.airflow.db_url or f"sqlite:///{paths.db}"
    url = base_url(settings)
    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str(paths.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str((dags_folder or PROJECT_ROOT / "dags").resolve()),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": settings.airflow.executor,
            "AIRFLOW__CORE__PARALLELISM": str(settings.airflow.parallelism),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
            "AIRFLOW__CORE__FERNET_KEY": keys["fernet_key"],
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(paths.passwords_file),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_url,
            "AIRFLOW__API__HOST": services.LOCALHOST,
            "AIRFLOW__API__PORT": str(settings.airflow.port),
            "AIRFLOW__API__BASE_URL": url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": keys["secret_key"],
            "AIRFLOW__API_AUTH__JWT_SECRET": keys["jwt_secret"],
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(paths.logs),
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "AIRFLOW__SCHEDULER__STANDALONE_DAG_PROCESSOR": "True",
            # task processes import the project (recsys, the rooms) from the repository
            "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        }
    )
    return env


def airflow_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "airflow", *args]


def run_airflow(
    settings: Settings, *args: str, timeout: float = 600.0, dags_folder: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one Airflow CLI command against this deployment's home and DB; output captured."""
    return subprocess.run(
        airflow_cmd(*args),
        env=airflow_env(settings, dags_folder),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=PROJECT_ROOT,
    )


def migrate(settings: Settings) -> None:
    """Create or upgrade the metadata DB (idempotent)."""
    layout(settings).home.mkdir(parents=True, exist_ok=True)
    done = run_airflow(settings, "db", "migrate")
    if done.returncode != 0:
        raise AirflowError(f"`airflow db migrate` failed:\n{(done.stdout + done.stderr)[-3000:]}")


def _service_name(component: str) -> str:
    return f"airflow-{component}"


def _component_cmd(settings: Settings, component: str) -> list[str]:
    if component == "api-server":
        args = airflow_cmd(
            "api-server", "--host", services.LOCALHOST, "--port", str(settings.airflow.port), "--workers", "1"
        )
    elif component in ("scheduler", "triggerer"):
        args = airflow_cmd(component, "--skip-serve-logs")
    else:
        args = airflow_cmd(component)
    # Airflow rewrites its process titles (setproctitle), so the PID file tracks a small supervisor
    # whose command line names this run directory; stopping its process group stops Airflow's too.
    return [sys.executable, "-m", "local_services.airflow", str(layout(settings).pid_arg(component)), "--", *args]


def health(settings: Settings, timeout: float = 2.0) -> dict | None:
    """The api-server's health report (metadatabase, scheduler, triggerer, dag processor), None if unreachable."""
    try:
        response = httpx.get(f"{base_url(settings)}/api/v2/monitor/health", timeout=timeout)
        response.raise_for_status()
        return response.json()
    except (httpx.HTTPError, ValueError):
        return None


def _healthy(report: dict | None, component: str) -> bool:
    if report is None:
        return False
    if component == "api-server":
        return report.get("metadatabase", {}).get("status") == "healthy"
    return (report.get(HEALTH_KEYS[component]) or {}).get("status") == "healthy"


@dataclass(frozen=True)
class UpResult:
    url: str
    user: str
    password: str
    password_new: bool
    started: list[str]


def up(settings: Settings, dags_folder: Path | None = None) -> UpResult:
    """Migrate the DB and start every component that does not run yet; wait until all report healthy."""
    paths = layout(settings)
    password, created = ensure_admin_password(settings)
    (paths.home / "pids").mkdir(parents=True, exist_ok=True)
    running = {e.name for e in services.status(settings.local.run_dir) if e.running}
    if _service_name("api-server") not in running and services.port_open(settings.airflow.port):
        raise AirflowError(
            f"port {settings.airflow.port} is taken by another process; choose another with RECSYS_AIRFLOW_PORT"
        )
    migrate(settings)
    env = airflow_env(settings, dags_folder)
    started = []
    deadline = time.monotonic() + settings.airflow.start_timeout_s
    for component in COMPONENTS:
        name = _service_name(component)
        if name in running:
            continue
        port = settings.airflow.port if component == "api-server" else 0
        services.spawn(
            settings.local.run_dir,
            name,
            _component_cmd(settings, component),
            port,  # noqa: SLF001
            str(paths.pid_arg(component)),
            cwd=PROJECT_ROOT,
            env=env,
        )
        started.append(component)
        if component == "api-server":
            _wait_healthy(settings, [component], deadline)
    _wait_healthy(settings, list(COMPONENTS), deadline)
    return UpResult(base_url(settings), ADMIN_USER, password, created, started)


def _wait_healthy(settings: Settings, components: list[str], deadline: float) -> None:
    report: dict | None = None
    while time.monotonic() < deadline:
        report = health(settings)
        if all(_healthy(report, c) for c in components):
            return
        alive = {e.name: e for e in services.status(settings.local.run_dir)}
        for component in components:
            entry = alive.get(_service_name(component))
            if entry is not None and not entry.running:
                tail = services.log_tail(entry.log_file, 30)
                raise AirflowError(f"airflow {component} exited during start-up; last log lines:\n{tail}")
        time.sleep(1.0)
    raise AirflowError(
        f"Airflow not healthy after {settings.airflow.start_timeout_s:.0f}s: {report}; "
        f"logs under {settings.local.run_dir / 'logs'}"
    )


def down(settings: Settings) -> list[tuple[str, bool]]:
    """Stop the components `up` started (scheduler first, so no task is handed to a stopping api-server)."""
    return [
        (component, services.stop(settings.local.run_dir, _service_name(component), timeout=30.0))
        for component in reversed(COMPONENTS)
    ]


def status(settings: Settings) -> tuple[list[services.ServiceStatus], dict | None]:
    """PID-file state of every component, and the api-server's health report (None when unreachable)."""
    names = {_service_name(c) for c in COMPONENTS}
    entries = [e for e in services.status(settings.local.run_dir) if e.name in names]
    return entries, health(settings) if any(e.running for e in entries) else None


def api_token(settings: Settings, password: str | None = None) -> str:
    """A bearer token of the REST API (/api/v2) for the admin user."""
    password = password or ensure_admin_password(settings)[0]
    response = httpx.post(
        f"{base_url(settings)}/auth/token", json={"username": ADMIN_USER, "password": password}, timeout=10.0
    )
    if response.status_code >= 300:
        raise AirflowError(f"login to {base_url(settings)} failed: {response.status_code} {response.text[:200]}")
    return response.json()["access_token"]


def _supervise(argv: list[str]) -> int:
    """``python -m local_services.airflow MARKER -- CMD...``: run CMD, pass SIGTERM/SIGINT on, exit with its code."""
    import signal

    cmd = argv[argv.index("--") + 1 :]
    child = subprocess.Popen(cmd)

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return child.wait()


if __name__ == "__main__":  # pragma: no cover - started by up()
    sys.exit(_supervise(sys.argv[1:]))
