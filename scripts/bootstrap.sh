#!/usr/bin/env bash
# Install everything the project needs on a fresh machine of this kind; safe to re-run.
#   - uv (from PyPI) and the locked Python environment (.venv)
#   - redis-server and prometheus (Debian packages)
#   - Java 17+ and Maven are expected on the machine (Kafka's jars are fetched from Maven
#     Central on first start by `recsys services up` or the test fixtures)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*" >&2; }

if ! command -v uv >/dev/null 2>&1; then
  log "installing uv"
  python3 -m pip install --quiet --disable-pip-version-check "uv==0.13.9" 2>&1 | grep -v "Running pip as the 'root'" || true
  export PATH="$HOME/.local/bin:$PATH"
fi

if ! command -v redis-server >/dev/null 2>&1; then
  log "installing redis-server"
  if [ "$(id -u)" -ne 0 ]; then echo "redis-server missing and not root: apt-get install -y redis-server" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
fi

# The live view of the loop (issue #19): Debian's Prometheus scrapes every component and serves the dashboard
if ! command -v prometheus >/dev/null 2>&1; then
  log "installing prometheus (Debian)"
  if [ "$(id -u)" -ne 0 ]; then echo "prometheus missing and not root: apt-get install -y prometheus" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq prometheus >/dev/null
  # the package starts a system-wide prometheus (0.0.0.0:9090) and its node exporter; the project runs its own
  if command -v systemctl >/dev/null 2>&1; then systemctl disable --now prometheus prometheus-node-exporter 2>/dev/null || true; fi
fi

for tool in java mvn; do
  command -v "$tool" >/dev/null 2>&1 || { echo "$tool is required (Kafka runs on the JVM; its jars come via Maven)" >&2; exit 1; }
done

log "syncing the Python environment (uv.lock)"
uv sync --frozen --quiet

# Browser tests of the Airflow UI (issue #6): Debian's chromium, driven by playwright-core from npm
# (never a browser download: playwright-core ships no browser).
if [ ! -x /usr/bin/chromium ]; then
  log "installing chromium (Debian)"
  if [ "$(id -u)" -ne 0 ]; then echo "chromium missing and not root: apt-get install -y chromium" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  command -v npm >/dev/null 2>&1 || { echo "npm is required for the browser tests (Node 20+)" >&2; exit 1; }
  log "installing playwright-core (npm, tests/browser)"
  (cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --silent)
fi
