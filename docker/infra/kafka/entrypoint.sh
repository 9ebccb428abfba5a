#!/bin/bash
# KAFKA_FOO_BAR=v -> foo.bar=v (`__` -> `_`, `___` -> `-`), the public image's convention; the JVM's
# own variables are not properties. Formats the KRaft storage on first start (CLUSTER_ID).
set -euo pipefail
props=/opt/kafka/config/server.properties
: > "$props"
while IFS='=' read -r name value; do
  case "$name" in
    KAFKA_HEAP_OPTS|KAFKA_OPTS|KAFKA_JVM_PERFORMANCE_OPTS|KAFKA_LOG4J_OPTS|KAFKA_JMX_OPTS|KAFKA_VERSION) continue ;;
  esac
  key="${name#KAFKA_}"
  key="$(printf '%s' "$key" | tr 'A-Z' 'a-z' | sed -e 's/___/-/g' -e 's/__/@/g' -e 's/_/./g' -e 's/@/_/g')"
  printf '%s=%s\n' "$key" "${!name}" >> "$props"
done < <(env | grep -o '^KAFKA_[A-Z0-9_]*=' | tr -d '=' | sed 's/$/=/')
grep -q '^log.dirs=' "$props" || echo "log.dirs=/var/lib/kafka/data" >> "$props"
log_dirs="$(sed -n 's/^log.dirs=//p' "$props")"
java_run=(java ${KAFKA_HEAP_OPTS:--Xmx512m -Xms512m} -XX:+UseG1GC -Djava.awt.headless=true
  -Dlog4j2.configurationFile=/opt/kafka/config/log4j2.properties -cp '/opt/kafka/libs/*')
if [ ! -f "${log_dirs%%,*}/meta.properties" ]; then
  "${java_run[@]}" kafka.tools.StorageTool format -t "${CLUSTER_ID:-5L6g3nShT-eMCtK--X86sw}" -c "$props" \
    --ignore-formatted >/dev/null
fi
exec "${java_run[@]}" kafka.Kafka "$props"
