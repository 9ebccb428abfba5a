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

import logging
import warnings

# what a task log of the lifecycle need not show: libraries' notes to their own users' developers
_QUIET_LOGGERS = ("alembic", "urllib3", "git", "mlflow.store.db.utils", "mlflow.tracking._tracking_service")


def quiet_libraries(_context: object = None) -> None:
    """Filter library deprecation warnings and chatter out of the log of the process that calls it.

    Called where an orchestrator's task runs: the DAGs' ``on_execute_callback`` (its argument, the
    task's context, is not needed), so it acts in the task's process right before the task body.
    Not at DAG-file import: Airflow parses DAG files inside ``warnings.catch_warnings``, which
    restores the filters afterwards. The libraries stay unchanged; their warnings and errors still show.
    """
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class LifecycleError(RuntimeError):
    """A lifecycle step cannot succeed; the message says why (an orchestrator shows it and may retry)."""
