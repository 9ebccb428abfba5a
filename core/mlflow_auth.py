"""MLflow's clients authenticated from the typed settings (README "Deploying safely").

MLflow's REST clients (``MlflowClient``, artifact downloads) take basic-auth credentials from the
environment only (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, read per request),
so settings that carry credentials are exported there before a client is made. Every client of
ours gets its tracking URI through ``tracking_uri``, which does that. Imports nothing of MLflow.
"""

from __future__ import annotations

import os

from core.settings import MlflowSettings

USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"


def tracking_uri(mlflow: MlflowSettings | str) -> str:
    """The tracking URI of ``mlflow``; settings with credentials export them for MLflow's clients first.

    A bare URI (tests, sqlite files) leaves the environment as it is.
    """
    if isinstance(mlflow, str):
        return mlflow
    if mlflow.password is not None:
        assert mlflow.username is not None  # the settings require both together
        os.environ[USERNAME_ENV] = mlflow.username
        os.environ[PASSWORD_ENV] = mlflow.password.get_secret_value()
    return mlflow.tracking_uri
