"""Import Feast without turning this process's Prometheus metrics into multiprocess mode.

``import feast`` imports ``feast.metrics``, which sets ``PROMETHEUS_MULTIPROCESS_DIR`` and
``PROMETHEUS_MULTIPROC_DIR`` to a temporary folder (for its Gunicorn feature server). If
``prometheus_client`` is imported after that, every metric of the process keeps its value in
files keyed by name: two registries with a counter of one name then share its value (serving's
per-app metrics, the simulator's per-phase registry), and every child process inherits the
variables and a folder Feast deletes when its owner exits. We use no Feast server, so: import
``prometheus_client`` first (it picks its single-process value class at import), then Feast, then
drop the variables Feast set. Imported by every module of ours that imports Feast, before it does.
"""

from __future__ import annotations

import os

import prometheus_client.values  # noqa: F401 - picks the single-process value class now, before Feast runs

_VARIABLES = ("PROMETHEUS_MULTIPROCESS_DIR", "PROMETHEUS_MULTIPROC_DIR")


def _import_feast() -> None:
    before = {name: os.environ.get(name) for name in _VARIABLES}
    import feast  # noqa: F401

    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)


_import_feast()
