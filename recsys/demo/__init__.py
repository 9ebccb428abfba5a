"""`recsys demo`: the whole loop on one machine, measured, and a report of it.

Services (Kafka, Redis, parameter service with two inference replicas, MLflow, Airflow, the
stream worker, serving) -> simulated traffic -> the training DAG through the running Airflow ->
champion served -> recommendations queried -> freshness probes -> Markdown + PNG report.

One job a module: ``config`` (options, report record, the settings the demo needs), ``stages``
(the loop's steps), ``probes`` (freshness), ``report`` (report.json/.md and plots), ``run`` (the
order of the stages and the typer command). Like ``recsys/cli.py`` the demo orchestrates the
rooms, so it imports them, always inside functions: importing it (``recsys --help``) stays cheap.
"""

from recsys.demo.config import CHAINS, DemoConfig, DemoError, Report, demo_overrides
from recsys.demo.report import quantiles, write_report
from recsys.demo.run import app, run_demo

__all__ = [
    "CHAINS",
    "DemoConfig",
    "DemoError",
    "Report",
    "app",
    "demo_overrides",
    "quantiles",
    "run_demo",
    "write_report",
]
