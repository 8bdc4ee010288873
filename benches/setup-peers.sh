#!/usr/bin/env bash
# Install the peer VMMs `keystone bench boot --against` compares with.
# Never needed by the tests. QEMU comes from Debian's packages; Firecracker
# is used when a `firecracker` binary is already on PATH.
set -euo pipefail
if ! command -v qemu-system-x86_64 >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86
fi
qemu-system-x86_64 --version | head -1
command -v firecracker >/dev/null && firecracker --version | head -1 || echo "firecracker: not on PATH (optional)"
