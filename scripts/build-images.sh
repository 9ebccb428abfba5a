#!/usr/bin/env bash
# Build the images of docker/compose.yaml with podman on this machine (no registry reachable here).
#   localhost/debian-base:bookworm   scripts/base-image.sh (debootstrap), when missing
#   localhost/recsys-redis, -postgres, -kafka   docker/infra/*: Debian's redis-server and
#       postgresql-15, and Kafka's jars (fetched from Maven Central as the local services do) on a JRE,
#       each honouring the same environment and paths as the public image compose names by default
#   recsys:latest                    docker/Dockerfile on the Debian base
# Re-running rebuilds from podman's layer cache (seconds when nothing changed).
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/docker/podman/containers.conf}"
BASE_IMAGE="${BASE_IMAGE:-localhost/debian-base:bookworm}"
log() { printf '\033[1m[build-images]\033[0m %s\n' "$*" >&2; }

BASE_IMAGE="$BASE_IMAGE" ./scripts/base-image.sh
build() { podman build --layers --build-arg "BASE_IMAGE=$BASE_IMAGE" "$@" >/dev/null; }
started=$(date +%s)

for infra in redis postgres; do
  log "localhost/recsys-$infra"
  build -t "localhost/recsys-$infra:latest" "docker/infra/$infra"
done

log "localhost/recsys-kafka (jars from Maven Central, as local_services.kafka fetches them)"
kafka_home="$(uv run --frozen python -c '
from core.settings import Settings
from local_services.kafka import ensure_kafka_jars
s = Settings()
print(ensure_kafka_jars(s.local.cache_dir, s.local.kafka_version).parent)')"
kafka_version="$(basename "$kafka_home")"
tools="$kafka_home/tools"
if [ ! -f "$tools/kafka-tools-$kafka_version.jar" ]; then
  # the healthcheck's kafka-broker-api-versions.sh lives in kafka-tools, which the broker does not need
  mvn -q -B dependency:copy "-Dartifact=org.apache.kafka:kafka-tools:$kafka_version" "-DoutputDirectory=$tools" >&2
fi
context="$(mktemp -d /var/tmp/recsys-kafka-context.XXXXXX)"
trap 'rm -rf "$context"' EXIT
cp -r docker/infra/kafka/. "$context/"
mkdir -p "$context/libs" && cp "$kafka_home"/libs/*.jar "$tools"/*.jar "$context/libs/"
build -t "localhost/recsys-kafka:latest" "$context"

# the Dockerfile's uv cache mount lives in podman's build cache (/var/tmp/buildah-cache): the locked
# wheels are downloaded by the first build only
log "recsys:latest (docker/Dockerfile on $BASE_IMAGE)"
app_started=$(date +%s)
ca_bundle="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"
build -t recsys:latest -f docker/Dockerfile --ignorefile docker/Dockerfile.dockerignore \
  -v "$ca_bundle:/run/host-ca.crt:ro" --build-arg CA_BUNDLE=/run/host-ca.crt .
now=$(date +%s)
log "built in $((now - started)) s (recsys:latest $((now - app_started)) s);" \
  "recsys:latest is $(podman image inspect --format '{{.Size}}' recsys:latest | numfmt --to=iec) "
