"""The MLflow model registry as the lifecycle reads it: a client, and the ``champion`` alias."""

from __future__ import annotations

from typing import Any

from core.mlflow_auth import tracking_uri
from core.settings import MlflowSettings

CHAMPION = "champion"


def client_for(tracking: MlflowSettings | str) -> Any:
    """An MlflowClient of the tracking server and registry of ``tracking`` (the settings, authenticated when
    they carry credentials, or a bare URI); mlflow is imported here."""
    from mlflow import MlflowClient

    uri = tracking_uri(tracking)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def champion_version(client: Any, model_name: str) -> str | None:
    """The version the ``champion`` alias points at, None when there is none (or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
