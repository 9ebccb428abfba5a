#!/usr/bin/env bash
# The main job, end to end, on local services (run through `make demo`, which bootstraps first).
# Extended by later stages of the loop; today: services up -> simulated traffic into Kafka -> read back.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1;34m==> %s\033[0m\n' "$*" >&2; }

REQUESTS="${DEMO_REQUESTS:-20000}"

step "starting Kafka and Redis on 127.0.0.1 (logs under ${RECSYS_RUN_DIR:-.run}/logs)"
uv run recsys services up

step "simulating ${REQUESTS} recommendation requests into Kafka (1% malformed records injected)"
uv run recsys simulate --requests "$REQUESTS" --bad-fraction 0.01 --seed 1

step "reading the events topic back and validating every record against the contract"
uv run recsys events summary

step "done: services keep running; stop them with 'uv run recsys services down'"
uv run recsys services status
