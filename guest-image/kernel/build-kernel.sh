#!/usr/bin/env bash
# Build the Keystone guest kernel from Debian's linux-source-6.1 with our
# config fragment, cached by content hash (source tarball + fragment + this
# script). Prints the cache directory holding vmlinux and bzImage.
#
#   guest-image/kernel/build-kernel.sh [CACHE_ROOT]
#
# Needs: linux-source-6.1 flex bison bc libelf-dev libssl-dev (Debian).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache_root="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/keystone/kernel}"
tarball=/usr/src/linux-source-6.1.tar.xz
[ -r "$tarball" ] || { echo "error: $tarball missing: apt-get install linux-source-6.1" >&2; exit 1; }
fragment="$here/keystone.config"
hash="$( (sha256sum "$tarball" | cut -d' ' -f1; cat "$fragment" "$0") | sha256sum | cut -c1-16)"
out="$cache_root/$hash"
if [ -s "$out/vmlinux" ] && [ -s "$out/bzImage" ]; then
  echo "$out"; exit 0
fi
start=$(date +%s)
work="$cache_root/build-$hash"
rm -rf "$work"; mkdir -p "$work"
tar -C "$work" -xf "$tarball"
src="$work/linux-source-6.1"
make -C "$src" -s tinyconfig >&2
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$fragment" >&2
make -C "$src" -s olddefconfig >&2
for opt in VIRTIO_MMIO_CMDLINE_DEVICES VIRTIO_BLK VIRTIO_NET VIRTIO_VSOCKETS EXT4_FS SERIAL_8250_CONSOLE PVH; do
  grep -q "^CONFIG_$opt=y" "$src/.config" || { echo "error: CONFIG_$opt did not stick" >&2; exit 1; }
done
make -C "$src" -s -j"$(nproc)" vmlinux bzImage >&2
mkdir -p "$out.tmp"
cp "$src/vmlinux" "$src/arch/x86/boot/bzImage" "$src/.config" "$out.tmp/"
rm -rf "$out"; mv "$out.tmp" "$out"; rm -rf "$work"
echo "kernel built in $(( $(date +%s) - start )) s" >&2
echo "$out"
