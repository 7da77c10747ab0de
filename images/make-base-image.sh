#!/usr/bin/env bash
# Make a local base image for offline (wheelhouse) builds where no registry is
# reachable: a minimal Debian 12 root filesystem with Python 3.11 and venv,
# imported into the local Docker engine. Needs root and debootstrap.
#
#   images/make-base-image.sh [IMAGE_NAME]      # default local/debian-py:bookworm
#
# Then build with `--base-image IMAGE_NAME` (or the matrix's default for the
# offline cells, which is this name).
set -euo pipefail
name=${1:-local/debian-py:bookworm}
if docker image inspect "$name" >/dev/null 2>&1; then
  echo "$name already in the engine"; exit 0
fi
command -v debootstrap >/dev/null || { echo "needs debootstrap (apt-get install debootstrap)" >&2; exit 2; }
root=$(mktemp -d /tmp/harness-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" >/tmp/harness-debootstrap.log 2>&1 \
  || { tail -20 /tmp/harness-debootstrap.log >&2; exit 1; }
tar -C "$root" -c . | docker import - "$name" >/dev/null
echo "imported $name"
