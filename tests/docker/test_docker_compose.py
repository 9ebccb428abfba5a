"""docker/compose.yaml: parses, runs only real commands, reads only real settings, no port clashes, healthchecks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
import yaml

from core.settings import PROJECT_ROOT, Settings, environment_names
from recsys.cli import app

COMPOSE = PROJECT_ROOT / "docker" / "compose.yaml"
EXPECTED = {
    "kafka",
    "redis-train",
    "redis-replica-a",
    "redis-replica-b",
    "postgres",
    "mlflow",
    "airflow-api-server",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "stream-worker",
    "trainer",
    "serving-a",
    "serving-b",
}
INTERPOLATION = re.compile(r"\$\{([A-Z_]+)(?::?([-?])([^}]*))?\}")
# a required secret (`${NAME:?message}`) that this test's environment does not set
PLACEHOLDER_SECRET = "placeholder-secret-123"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str) -> str:
    def value_of(m: re.Match) -> str:
        default = m.group(3) if m.group(2) == "-" else PLACEHOLDER_SECRET if m.group(2) == "?" else ""
        return os.environ.get(m.group(1), default or "")

    return INTERPOLATION.sub(value_of, value)


def test_compose_parses_and_has_every_role(compose: dict) -> None:
    assert EXPECTED <= set(compose["services"])
    for name, service in compose["services"].items():
        assert "image" in service, name
        for dependency in service.get("depends_on", {}):
            assert dependency in compose["services"], f"{name} depends on unknown {dependency}"


def app_services(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if s["image"] == "recsys:latest"}


def test_every_recsys_command_exists_in_the_cli(compose: dict) -> None:
    root = typer.main.get_command(app)
    checked = 0
    for name, service in app_services(compose).items():
        if service.get("entrypoint") is not None:
            continue
        command = root
        ctx = root.context_class(root)
        for token in service["command"]:
            if token.startswith("-"):
                break
            assert hasattr(command, "get_command"), f"{name}: {command.name} takes no subcommand {token!r}"
            sub = command.get_command(ctx, token)
            assert sub is not None, f"{name}: `recsys ... {token}` does not exist"
            command = sub
        options = {opt for param in command.params for opt in getattr(param, "opts", [])}
        for token in service["command"]:
            if token.startswith("--"):
                assert token in options, f"{name}: {command.name} has no option {token}"
        checked += 1
    assert checked >= 5


def test_other_entrypoints_are_installed_commands(compose: dict) -> None:
    bin_dir = Path(sys.executable).parent
    airflow_help = subprocess.run([bin_dir / "airflow", "--help"], capture_output=True, text=True, timeout=120).stdout
    for name, service in app_services(compose).items():
        entrypoint = service.get("entrypoint")
        if entrypoint is None:
            continue
        assert (bin_dir / entrypoint[0]).exists(), f"{name}: {entrypoint[0]} is not installed"
        if entrypoint[0] == "airflow":
            assert re.search(rf"^\s+{re.escape(service['command'][0])}\s", airflow_help, re.M), name


def test_every_environment_variable_is_a_setting_with_a_valid_value(
    compose: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    fields = environment_names()
    for name, service in app_services(compose).items():
        recsys_env = {k: interpolate(str(v)) for k, v in service["environment"].items() if k.startswith("RECSYS_")}
        assert recsys_env, name
        unknown = set(recsys_env) - fields
        assert not unknown, f"{name}: {sorted(unknown)} are not read by the settings object"
        for key in list(os.environ):
            if key.startswith("RECSYS_"):
                monkeypatch.delenv(key)
        for key, value in recsys_env.items():
            monkeypatch.setenv(key, value)
        settings = Settings()  # raises on any invalid value
        assert settings.kafka.bootstrap == "kafka:19092"
        assert len(settings.ps.replicas) == 2


def test_serving_instances_each_read_their_own_replica_first(compose: dict) -> None:
    import json

    services = compose["services"]
    first_a = json.loads(services["serving-a"]["environment"]["RECSYS_PS_REPLICAS"])[0]
    first_b = json.loads(services["serving-b"]["environment"]["RECSYS_PS_REPLICAS"])[0]
    assert "redis-replica-a" in first_a and "redis-replica-b" in first_b


def host_ports(compose: dict) -> dict[str, str]:
    """Published host port -> service, with the port variables' defaults (``IP:HOST:CONTAINER``)."""
    seen: dict[str, str] = {}
    for name, service in compose["services"].items():
        for mapping in service.get("ports", []):
            host = interpolate(str(mapping)).split(":")[-2]
            assert host not in seen, f"host port {host} used by {seen.get(host)} and {name}"
            seen[host] = name
    return seen


def test_host_ports_do_not_clash(compose: dict) -> None:
    assert len(host_ports(compose)) >= 8


def test_every_host_port_and_its_address_is_configurable(compose: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second stack (the smoke test's) must be able to publish every port elsewhere, on 127.0.0.1 only."""
    defaults = host_ports(compose)
    variables = {
        m.group(1)
        for service in compose["services"].values()
        for mapping in service.get("ports", [])
        for m in INTERPOLATION.finditer(str(mapping))
    }
    assert "RECSYS_DEPLOY_HOST_IP" in variables
    monkeypatch.setenv("RECSYS_DEPLOY_HOST_IP", "127.0.0.1")
    for offset, variable in enumerate(sorted(variables - {"RECSYS_DEPLOY_HOST_IP"})):
        monkeypatch.setenv(variable, str(40000 + offset))
    for name, service in compose["services"].items():
        for mapping in service.get("ports", []):
            ip, host, _container = interpolate(str(mapping)).split(":")
            assert ip == "127.0.0.1", name
            assert host not in defaults, f"{name}: host port {host} is not configurable"
    # what the host is told to connect to follows the port: Kafka's advertised listener, MLflow's allowed hosts
    kafka = compose["services"]["kafka"]
    kafka_port = interpolate("${RECSYS_DEPLOY_KAFKA_PORT:-9092}")
    assert f"EXTERNAL://localhost:{kafka_port}" in interpolate(kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"])
    mlflow_port = interpolate("${RECSYS_DEPLOY_MLFLOW_PORT:-5000}")
    allowed = interpolate(compose["services"]["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"]).split(",")
    assert f"localhost:{mlflow_port}" in allowed


def test_every_service_has_a_healthcheck(compose: dict) -> None:
    for name, service in compose["services"].items():
        assert "healthcheck" in service and service["healthcheck"].get("test"), f"{name} has no healthcheck"


def test_dockerfile_copies_every_python_package() -> None:
    dockerfile = (PROJECT_ROOT / "docker" / "Dockerfile").read_text()
    import tomllib

    packages = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"][
        "wheel"
    ]["packages"]
    for package in [*packages, "dags"]:
        assert f"COPY {package} ./{package}" in dockerfile, package
    assert "uv sync --frozen" in dockerfile


def test_deploying_safely_every_secret_is_required_and_every_client_uses_it(compose: dict) -> None:
    """README "Deploying safely": Redis with a password, Kafka with SASL, MLflow with basic auth."""
    services = compose["services"]
    for name, service in app_services(compose).items():
        env = {k: interpolate(str(v)) for k, v in service["environment"].items() if k.startswith("RECSYS_")}
        for key in ("RECSYS_PS_SHARDS", "RECSYS_PS_REPLICAS", "RECSYS_FEAST_REDIS_URL", "RECSYS_REDIS_URL"):
            assert env[key].count(f":{PLACEHOLDER_SECRET}@") >= 1, f"{name}: {key} has no password"
        assert env["RECSYS_KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT", name
        assert env["RECSYS_MLFLOW_PASSWORD"] == PLACEHOLDER_SECRET, name
        assert not any("redis://" in str(token) for token in service.get("command", [])), f"{name}: URL on argv"
    for name in ("redis-train", "redis-replica-a", "redis-replica-b", "redis-features"):
        assert "--requirepass" in " ".join(services[name]["command"]), name
    kafka_env = services["kafka"]["environment"]
    assert "EXTERNAL:SASL_PLAINTEXT" in kafka_env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
    assert "INTERNAL:SASL_PLAINTEXT" in kafka_env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
    mlflow = services["mlflow"]
    assert mlflow["command"][-2:] == ["--app-name", "basic-auth"]
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in mlflow["environment"]
    text = COMPOSE.read_text()
    for secret in ("KAFKA_SASL_PASSWORD", "REDIS_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY"):
        assert f"${{{secret}:?" in text and f"${{{secret}:-" not in text, f"{secret} must be required, no default"
