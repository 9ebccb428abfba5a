"""The model lifecycle as a library: whether to train, train once, evaluate, gate, promote, publish.

The training DAG only wires these steps (``dags/recsys_training.py``); each function is
idempotent, so an orchestrator may retry any step, and each takes the settings explicitly.

- ``job``: new samples since the last committed job; `recsys train` once per orchestrator run;
- ``evaluation``: the champion and the challenger scored on the challenger's evaluation set, each with its rows;
- ``served``: a job's staged rows promoted with its model, dropped when refused; rollback;
- ``gate``: the promotion rule and the MLflow registry alias ``champion``;
- ``publish``: wait until every inference replica applied a version; reload serving.

Heavy libraries (mlflow, torch, httpx) are imported inside the functions that need them.
"""


class LifecycleError(RuntimeError):
    """A lifecycle step cannot succeed; the message says why (an orchestrator shows it and may retry)."""
