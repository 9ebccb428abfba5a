#!/usr/bin/env bash
# The main job, end to end (run through `make demo`, which bootstraps first): `recsys demo` starts
# Kafka, Redis (training copy + two inference replicas), MLflow, Airflow, the stream worker and
# serving; simulates traffic; runs the training DAG through Airflow; queries the champion; measures
# freshness; writes reports/demo-<time>/report.md (+ PNG plots) and prints its path and the URLs.
# Options pass through (`./scripts/demo.sh --stop` stops everything at the end; `--help` lists them);
# DEMO_REQUESTS sizes the simulated traffic.
set -euo pipefail
cd "$(dirname "$0")/.."

uv run recsys demo --requests "${DEMO_REQUESTS:-4000}" "$@"
