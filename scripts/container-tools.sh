#!/usr/bin/env bash
# podman, runc, debootstrap and podman-compose (Debian packages) for docker/ on this machine; safe to re-run.
# Source-able: the callers export CONTAINERS_CONF=docker/podman/containers.conf (runc, explicit ulimits).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in podman:podman runc:runc debootstrap:debootstrap podman-compose:podman-compose; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${tool%%:*}" ] || missing+=("${tool##*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  printf '\033[1m[container-tools]\033[0m installing %s\n' "${missing[*]}" >&2
  if [ "$(id -u)" -ne 0 ]; then echo "not root: apt-get install -y ${missing[*]}" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi
