"""Local services started by the project itself on 127.0.0.1: the process bookkeeping, Redis and MLflow.

Each started process gets a PID file (JSON: pid, port, command line) and a log file under
``run_dir``; ``stop`` ends exactly the processes whose PID files we wrote, after checking
that the PID still belongs to the command we started (PIDs get reused). ``up`` is
idempotent: a service whose recorded process is alive and answering is left alone.

The same functions back ``recsys services up|down|status`` and the pytest fixtures (which
use a temporary run directory and free ports, so tests never collide with a running demo).
Kafka, which needs its jars fetched first, is ``local_services.kafka`` on top of this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.procs import LOCALHOST, free_port, process_start_ticks  # noqa: F401  (re-exported for the fixtures)
from core.settings import MlflowSettings


class ServiceError(RuntimeError):
    """A local service could not be installed, started or stopped."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    port: int | None
    running: bool
    log_file: Path

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}" if self.port else "-"


def port_open(port: int, host: str = LOCALHOST, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


# --------------------------------------------------------------------------- PID files


def _pid_dir(run_dir: Path) -> Path:
    return run_dir / "pids"


def log_file_of(run_dir: Path, name: str) -> Path:
    """Where the output of service ``name`` goes."""
    return run_dir / "logs" / f"{name}.log"


def _read_pid_file(run_dir: Path, name: str) -> dict | None:
    path = _pid_dir(run_dir) / f"{name}.pid"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _process_matches(pid: int, marker: str) -> bool:
    """True when ``pid`` is alive and its command line contains ``marker`` (guards PID reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    if marker not in cmdline:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def recorded_alive(run_dir: Path, name: str) -> dict | None:
    """The PID record of service ``name`` when its process still runs (the same command), else None."""
    record = _read_pid_file(run_dir, name)
    if record and _process_matches(record["pid"], record["marker"]):
        return record
    return None


def spawn(
    run_dir: Path,
    name: str,
    cmd: list[str],
    port: int,
    marker: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    """Start ``cmd`` in its own session with output to the service's log, and write its PID file."""
    log_file = log_file_of(run_dir, name)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    _pid_dir(run_dir).mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
            start_new_session=True,  # outlives `recsys services up`
        )
    record = {"pid": proc.pid, "port": port, "marker": marker, "cmd": cmd, "started": time.time()}
    (_pid_dir(run_dir) / f"{name}.pid").write_text(json.dumps(record))
    return record


def wait_until(check: Callable[[], bool], timeout: float, what: str, log_file: Path, pid: int) -> None:
    """Poll ``check`` until it holds; ServiceError with the log's tail when ``pid`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not Path(f"/proc/{pid}").exists() or not _process_matches(pid, ""):
            raise ServiceError(f"{what} exited during start-up; last log lines:\n{log_tail(log_file)}")
        time.sleep(0.2)
    raise ServiceError(f"{what} not ready after {timeout:.0f}s; last log lines:\n{log_tail(log_file)}")


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def stop(run_dir: Path, name: str, timeout: float = 20.0) -> bool:
    """Stop the service ``name`` if we started it; returns True when a process was stopped."""
    record = recorded_alive(run_dir, name)
    pid_file = _pid_dir(run_dir) / f"{name}.pid"
    if record is None:
        pid_file.unlink(missing_ok=True)
        return False
    pid = record["pid"]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _process_matches(pid, record["marker"]):
        time.sleep(0.1)
    if _process_matches(pid, record["marker"]):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    # An exiting process loses its command line (its memory) before its sockets close, so the loop
    # above can end while the port still accepts: wait for the port too, or a restart finds it taken.
    port = record.get("port")
    while port and time.monotonic() < deadline and port_open(port, timeout=0.1):
        time.sleep(0.05)
    pid_file.unlink(missing_ok=True)
    return True


def status(run_dir: Path) -> list[ServiceStatus]:
    """Every service with a PID file under ``run_dir``."""
    result = []
    for pid_file in sorted(_pid_dir(run_dir).glob("*.pid")) if _pid_dir(run_dir).exists() else []:
        name = pid_file.stem
        record = _read_pid_file(run_dir, name) or {}
        alive = bool(record) and _process_matches(record["pid"], record["marker"])
        result.append(ServiceStatus(name, record.get("pid"), record.get("port"), alive, log_file_of(run_dir, name)))
    return result


# --------------------------------------------------------------------------- Redis


def ensure_redis_installed() -> str:
    """Path of redis-server; installs Debian's package when it is missing and we are root."""
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ServiceError("redis-server is not installed; install it with `apt-get install -y redis-server`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "redis-server"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise ServiceError(f"`{' '.join(cmd)}` failed:\n{done.stderr[-2000:]}")
    found = shutil.which("redis-server")
    if not found:
        raise ServiceError("redis-server still missing after apt-get install")
    return found


@dataclass(frozen=True)
class RedisAuth:
    """Who a local redis-server lets in: ``password`` for ``username`` (None: Redis' default user)."""

    password: str
    username: str | None = None

    def command(self) -> bytes:
        """``AUTH [user] password`` in RESP."""
        args = [b"AUTH", *([self.username.encode()] if self.username else []), self.password.encode()]
        return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)

    def config(self) -> str:
        """redis.conf lines requiring these credentials (a named user replaces the default one, which is off)."""
        if not self.username or self.username == "default":
            return f"requirepass {_conf_quote(self.password)}\n"
        user, password = _conf_quote(self.username), _conf_quote(">" + self.password)
        return f"user default off\nuser {user} on {password} ~* &* +@all\n"


def _conf_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def redis_ping(port: int, auth: RedisAuth | None = None) -> bool:
    """True when the Redis on ``port`` answers PING (after AUTH with ``auth``)."""
    try:
        with socket.create_connection((LOCALHOST, port), timeout=0.5) as sock:
            sock.sendall((auth.command() if auth else b"") + b"PING\r\n")
            reply, lines = b"", 2 if auth else 1
            while reply.count(b"\r\n") < lines and (chunk := sock.recv(256)):
                reply += chunk
            return reply.startswith(b"+OK\r\n+PONG" if auth else b"+PONG")
    except OSError:
        return False


def start_redis(
    run_dir: Path,
    port: int,
    name: str = "redis",
    timeout: float = 30.0,
    extra_args: list[str] | None = None,
    auth: RedisAuth | None = None,
) -> dict:
    """Start redis-server on 127.0.0.1:``port`` without persistence (idempotent); with ``auth`` it lets in
    only clients that authenticate so (the credentials go in a config file only we can read, never on the
    command line)."""
    record = recorded_alive(run_dir, name)
    if record and redis_ping(record["port"], auth):
        return record
    if record is None and port_open(port):
        raise ServiceError(f"port {port} is already taken by another process; pick another with RECSYS_REDIS_PORT")
    binary = ensure_redis_installed()
    data_dir = run_dir / "data" / name
    data_dir.mkdir(parents=True, exist_ok=True)
    marker = f"{LOCALHOST}:{port}"
    config_file = data_dir / "auth.conf"
    config_file.unlink(missing_ok=True)
    if auth is not None:
        fd = os.open(config_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as config:
            config.write(auth.config())
    cmd = [
        binary,
        *([str(config_file)] if auth is not None else []),
        "--bind",
        LOCALHOST,
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(data_dir),
        "--daemonize",
        "no",
        "--protected-mode",
        "yes",
        *(extra_args or []),
    ]
    record = spawn(run_dir, name, cmd, port, marker)
    wait_until(lambda: redis_ping(port, auth), timeout, f"redis {name}", log_file_of(run_dir, name), record["pid"])
    return record


# --------------------------------------------------------------------------- any command, MLflow


def start_command(
    run_dir: Path,
    name: str,
    cmd: list[str],
    *,
    port: int = 0,
    marker: str | None = None,
    ready: Callable[[], bool] | None = None,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> dict:
    """Start ``cmd`` as the managed service ``name`` (PID file, log under ``run_dir``; idempotent).

    ``marker`` (default: the whole command line) must appear in the process's command line so a
    reused PID is never taken for the service; ``ready`` is polled until it returns True.
    """
    marker = marker or " ".join(cmd)
    record = recorded_alive(run_dir, name)
    if record is not None:
        return record
    if port and port_open(port):
        raise ServiceError(f"{name}: port {port} is already taken by another process")
    record = spawn(run_dir, name, cmd, port, marker, cwd=cwd, env=env)
    if ready is not None:
        wait_until(ready, timeout, name, log_file_of(run_dir, name), record["pid"])
    return record


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when GET ``url`` answers 2xx (used as a readiness check)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (local URLs only)
            return 200 <= response.status < 300
    except OSError:
        return False


@dataclass(frozen=True)
class MlflowAuth:
    """The admin user of a basic-auth MLflow server, and its CSRF secret (MLflow requires a static one)."""

    username: str
    password: str
    secret_key: str

    @classmethod
    def from_settings(cls, mlflow: MlflowSettings) -> MlflowAuth | None:
        """The settings' credentials (None: no authentication configured)."""
        if mlflow.password is None or mlflow.username is None:
            return None
        password = mlflow.password.get_secret_value()
        secret = mlflow.server_secret_key.get_secret_value() if mlflow.server_secret_key else None
        # a key of its own is better; derived, it is at least stable across restarts and no constant
        derived = hashlib.sha256(b"recsys-mlflow-csrf:" + password.encode()).hexdigest()
        return cls(mlflow.username, password, secret or derived)


def _mlflow_auth_env(home: Path, auth: MlflowAuth) -> dict[str, str]:
    """The environment of a basic-auth server: its config file (written 0600 under ``home``) and secrets."""
    config = home / "basic_auth.ini"
    config.unlink(missing_ok=True)
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        # no permission without a login: a client that does not authenticate cannot even read
        out.write(
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{home / 'basic_auth.db'}\n"
            f"admin_username = {auth.username}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
    return {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": auth.password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": auth.secret_key,
    }


def start_mlflow(
    run_dir: Path, port: int, name: str = "mlflow", timeout: float = 120.0, auth: MlflowAuth | None = None
) -> dict:
    """`mlflow server` on 127.0.0.1:``port``: SQLite backend and artifacts under ``run_dir/mlflow``.

    With ``auth`` it runs MLflow's basic-auth app: every request needs that user's (or another
    user's) credentials; the password reaches the server through its environment, never its
    command line.
    """
    import sys

    home = run_dir / "mlflow"
    (home / "artifacts").mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        LOCALHOST,
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination",
        str(home / "artifacts"),
        "--workers",
        "1",
        *(["--app-name", "basic-auth"] if auth is not None else []),
    ]
    return start_command(
        run_dir,
        name,
        cmd,
        port=port,
        marker=f"mlflow server --host {LOCALHOST} --port {port}",
        ready=lambda: http_ok(f"http://{LOCALHOST}:{port}/health"),
        timeout=timeout,
        env=_mlflow_auth_env(home, auth) if auth is not None else None,
    )
