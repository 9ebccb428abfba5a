"""The local MLflow server with its basic-auth app: only an authenticated client moves the champion alias.

A real `mlflow server --app-name basic-auth` process on 127.0.0.1 (README "Deploying safely"); the
credentials come from the typed settings, as every client of ours takes them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core.mlflow_auth import PASSWORD_ENV, USERNAME_ENV, tracking_uri
from core.settings import MlflowSettings
from local_services import services
from training.lifecycle.registry import CHAMPION, champion_version, client_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "auth-test-model"


@pytest.fixture
def authed_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowSettings:
    for name in (USERNAME_ENV, PASSWORD_ENV):
        monkeypatch.delenv(name, raising=False)
    port = services.free_port()
    settings = MlflowSettings(
        tracking_uri=f"http://{services.LOCALHOST}:{port}", username="ops-admin", password="a-long-password-1"
    )
    auth = services.MlflowAuth.from_settings(settings)
    assert auth is not None
    # the server starts in ~20 s on a quiet machine; the bound is for a loaded one
    services.start_mlflow(tmp_path, port, auth=auth, timeout=240)
    yield settings
    services.stop(tmp_path, "mlflow")


def test_only_an_authenticated_client_moves_the_champion_alias(
    authed_server: MlflowSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException, RestException

    uri = authed_server.tracking_uri
    anonymous = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with pytest.raises((MlflowException, RestException)) as refused:
        anonymous.create_registered_model(MODEL)
    assert "401" in str(refused.value) or "nauthorized" in str(refused.value)

    admin = client_for(authed_server)  # exports the settings' credentials for MLflow's clients
    admin.create_registered_model(MODEL)
    run = admin.create_run(admin.create_experiment("auth-test"))
    first, second = (
        admin.create_model_version(MODEL, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version
        for _ in range(2)
    )
    admin.set_registered_model_alias(MODEL, CHAMPION, first)

    # the same process without credentials (another local process, in effect) cannot move it
    monkeypatch.delenv(USERNAME_ENV)
    monkeypatch.delenv(PASSWORD_ENV)
    with pytest.raises((MlflowException, RestException)):
        anonymous.set_registered_model_alias(MODEL, CHAMPION, second)
    wrong = MlflowSettings(tracking_uri=uri, username="ops-admin", password="not-the-password")
    with pytest.raises((MlflowException, RestException)):
        client_for(wrong).set_registered_model_alias(MODEL, CHAMPION, second)

    tracking_uri(authed_server)  # credentials back in the environment: the admin client works again
    assert champion_version(admin, MODEL) == str(first)
    admin.set_registered_model_alias(MODEL, CHAMPION, second)
    assert champion_version(admin, MODEL) == str(second)
