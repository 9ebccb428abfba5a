#!/usr/bin/env bash
# Make the Debian base image localhost/debian-base:bookworm when it is missing (idempotent).
#
# Why: no container registry is reachable from this machine, so `FROM python:3.11-slim` (or any
# public image) cannot be pulled. A minimal Debian rootfs from the Debian mirror the machine's apt
# already uses, imported into podman, is the base every image of docker/ is built on here.
#   BASE_IMAGE   name of the image to make (default localhost/debian-base:bookworm)
#   DEBIAN_MIRROR  mirror for debootstrap (default: the first Debian URI of the apt sources)
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE="${BASE_IMAGE:-localhost/debian-base:bookworm}"
log() { printf '\033[1m[base-image]\033[0m %s\n' "$*" >&2; }

./scripts/container-tools.sh

if podman image exists "$BASE_IMAGE"; then
  log "$BASE_IMAGE is there"
  exit 0
fi

if [ -z "${DEBIAN_MIRROR:-}" ]; then
  DEBIAN_MIRROR="$(grep -hoE 'https?://[^ ]+/debian/?$' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null | head -1 || true)"
  DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
fi

rootfs="$(mktemp -d /var/tmp/debian-base.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
log "debootstrap bookworm (minbase) from $DEBIAN_MIRROR"
debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR" >/dev/null
# apt inside the image: no recommends, no docs, no caches kept (what the slim images do)
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
log "importing into podman as $BASE_IMAGE"
tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
log "$BASE_IMAGE made ($(podman image inspect --format '{{.Size}}' "$BASE_IMAGE") bytes)"
