#!/usr/bin/env bash
# The compose stack on this machine with podman: `deploy.sh up` (make deploy) | `down` (make deploy-down)
# | `wait [SERVICE...]` (until those, default all, are healthy) | `urls`.
#
# up: builds the images when needed (scripts/build-images.sh), makes the secrets once (random, in
# .run/deploy/secrets.env, mode 600; an operator sets their own instead), starts docker/compose.yaml
# with podman-compose and waits until every service's healthcheck passes, printing the URLs.
# podman runs healthchecks from systemd timers; there is no systemd here, so `wait` runs each
# container's healthcheck itself (`podman healthcheck run`) until all pass.
#   RECSYS_DEPLOY_TIMEOUT  seconds to wait for healthy (default 600)
#   RECSYS_DEPLOY_PROJECT  the compose project (default recsys): its containers, network and volumes
#                          are named after it, so a second stack (the smoke test's) runs beside the first
#   RECSYS_DEPLOY_BUILD    0: start with the images as they are (the caller built them), no build step
#   RECSYS_DEPLOY_*_PORT   the published host ports (docker/compose.yaml names them; the URLs follow)
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/docker/podman/containers.conf}"
export KAFKA_IMAGE="${KAFKA_IMAGE:-localhost/recsys-kafka:latest}"
export REDIS_IMAGE="${REDIS_IMAGE:-localhost/recsys-redis:latest}"
export POSTGRES_IMAGE="${POSTGRES_IMAGE:-localhost/recsys-postgres:latest}"
PROJECT="${RECSYS_DEPLOY_PROJECT:-recsys}"
SECRETS="${RECSYS_DEPLOY_SECRETS:-$PWD/.run/deploy/secrets.env}"
log() { printf '\033[1m[deploy]\033[0m %s\n' "$*" >&2; }
compose() { podman-compose --no-ansi -p "$PROJECT" -f docker/compose.yaml "$@"; }

secrets() {
  if [ ! -f "$SECRETS" ]; then
    mkdir -p "$(dirname "$SECRETS")"
    umask 077
    {
      for name in KAFKA_SASL_PASSWORD KAFKA_BROKER_PASSWORD REDIS_PASSWORD MLFLOW_ADMIN_PASSWORD \
        MLFLOW_SECRET_KEY POSTGRES_PASSWORD RECSYS_SERVING_ADMIN_TOKEN; do
        printf '%s=%s\n' "$name" "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
      done
      printf 'AIRFLOW_JWT_SECRET=%s\n' "$(head -c 64 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    } > "$SECRETS"
    log "secrets made in $SECRETS"
  fi
  set -a
  # shellcheck disable=SC1090
  . "$SECRETS"
  set +a
}

# every service but those named (started already) and those of a profile (`trainer`: run on
# demand), which podman-compose 1.0 would start too
services_to_start() {
  uv run --frozen python -c '
import sys, yaml
services = yaml.safe_load(open("docker/compose.yaml"))["services"]
print(" ".join(name for name, service in services.items() if not service.get("profiles") and name not in sys.argv[1:]))' "$@"
}

containers() { podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'; }

wait_healthy() {  # the services named (default: every container of the project)
  local timeout="${RECSYS_DEPLOY_TIMEOUT:-600}" started now pending failed checks passed name services=("$@")
  started=$(date +%s)
  # a container whose check passed once is only required to keep running: on a loaded 2-core machine a
  # later check of a healthy service can time out, and re-requiring every check in one pass never ends
  passed="$(mktemp -d)"
  while :; do
    pending=()
    checks="$(mktemp -d)"
    for name in $(if [ "${#services[@]}" -gt 0 ]; then printf "${PROJECT}_%s_1\n" "${services[@]}"; else containers; fi); do
      # every container's check at once: some (the airflow CLI) take a minute under load
      (
        state="$(podman inspect --format '{{.State.Status}}' "$name")"
        case "$name" in
          *airflow-init*)  # a one-shot job: done once it exited 0
            [ "$state" = exited ] && [ "$(podman inspect --format '{{.State.ExitCode}}' "$name")" = 0 ] ;;
          *) [ "$state" = running ] && { [ -e "$passed/$name" ] || podman healthcheck run "$name" >/dev/null 2>&1; } ;;
        esac && touch "$passed/$name" || echo "$name:$state" > "$checks/$name"
      ) &
    done
    wait
    for failed in "$checks"/*; do [ -e "$failed" ] && pending+=("$(cat "$failed")"); done
    rm -rf "$checks"
    now=$(date +%s)
    if [ "${#pending[@]}" -eq 0 ]; then
      rm -rf "$passed"
      log "every service healthy $((now - started)) s after the wait began"
      return 0
    fi
    if [ $((now - started)) -ge "$timeout" ]; then
      rm -rf "$passed"
      log "not healthy after ${timeout} s: ${pending[*]}"
      return 1
    fi
    sleep 5
  done
}

urls() {
  cat <<URLS
  Kafka (SASL/PLAIN, user recsys)   localhost:${RECSYS_DEPLOY_KAFKA_PORT:-9092}
  MLflow (basic auth, user admin)   http://localhost:${RECSYS_DEPLOY_MLFLOW_PORT:-5000}
  Airflow (user admin; password: podman exec ${PROJECT}_airflow-api-server_1 cat /data/airflow/simple_auth_manager_passwords.json.generated)
                                    http://localhost:${RECSYS_DEPLOY_AIRFLOW_PORT:-8080}
  serving-a (replica-a first)       http://localhost:${RECSYS_DEPLOY_SERVING_A_PORT:-8000}
  serving-b (replica-b first)       http://localhost:${RECSYS_DEPLOY_SERVING_B_PORT:-8001}
  stream worker metrics             http://localhost:${RECSYS_DEPLOY_METRICS_PORT:-9100}/metrics
  Redis train/replica-a/replica-b/features (password REDIS_PASSWORD)  localhost:${RECSYS_DEPLOY_REDIS_TRAIN_PORT:-6379}/${RECSYS_DEPLOY_REDIS_REPLICA_A_PORT:-6380}/${RECSYS_DEPLOY_REDIS_REPLICA_B_PORT:-6381}/${RECSYS_DEPLOY_REDIS_FEATURES_PORT:-6382}
  secrets                           $SECRETS
URLS
}

case "${1:-up}" in
  up)
    stages=("kafka redis-train redis-replica-a redis-replica-b redis-features postgres" "mlflow airflow-init")
    if [ "${RECSYS_DEPLOY_BUILD:-1}" != 0 ]; then ./scripts/build-images.sh; fi
    mkdir -p .run/deploy
    log_file=".run/deploy/compose-$PROJECT.log"  # podman-compose's output (and podman's systemd complaints)
    : > "$log_file"
    secrets
    started=$(date +%s)
    # Created first, then started in stages, each healthy before the next starts: podman-compose 1.0
    # neither waits on depends_on's conditions nor starts only the services named, and a dozen
    # Python services starting before their brokers are up only crash and restart, starving 2 cores.
    compose up --no-build --no-start >/dev/null 2>>"$log_file"
    # shellcheck disable=SC2086
    for stage in "${stages[@]}" "$(services_to_start ${stages[*]})"; do
      # shellcheck disable=SC2086
      podman start $(printf "${PROJECT}_%s_1 " $stage) >/dev/null 2>>"$log_file"
      # shellcheck disable=SC2086
      wait_healthy $stage
    done
    log "stack healthy in $(( $(date +%s) - started )) s from \`up\`"
    urls
    ;;
  wait) shift; secrets; wait_healthy "$@" ;;
  urls) urls ;;
  down)
    secrets
    compose down -v >/dev/null 2>&1 || true
    left="$(containers)"
    if [ -n "$left" ]; then podman rm -f $left >/dev/null; fi
    log "stack down, its containers and volumes removed"
    ;;
  *) echo "usage: $0 up|down|wait|urls" >&2; exit 2 ;;
esac
