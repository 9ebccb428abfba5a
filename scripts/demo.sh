#!/usr/bin/env bash
# The main job, end to end (run through `make demo`, which bootstraps first): `recsys demo` starts
# Kafka, Redis (training copy + two inference replicas), MLflow, Airflow, the stream worker and
# serving; runs closed-loop traffic (simulated users clicking on what serving shows) from cold start
# through training rounds (the training DAG through Airflow) to a final champion; measures served CTR
# against random and oracle, AUC against the oracle AUC, freshness; writes reports/demo-<time>/report.md
# (+ PNG plots) and prints its path and the URLs.
# Options pass through (`./scripts/demo.sh --stop` stops everything at the end; `--help` lists them).
set -euo pipefail
cd "$(dirname "$0")/.."

uv run recsys demo "$@"
