#!/usr/bin/env bash
# Build a Keystone guest kernel from Debian's linux-source-6.1: `make
# tinyconfig`, then our fragments (no patches: an unmodified kernel),
# cached by content hash (source tarball + fragments + this script).
# Prints the cache directory holding vmlinux, bzImage and .config.
#
#   guest-image/kernel/build-kernel.sh [--variant NAME] [CACHE_ROOT]
#
# Variants:
#   sandbox   (default) keystone.config + sandbox.config: the sandbox kernel
#             (systemd, OpenSSH, overlay root); also the smoke image's kernel.
#   minimal   keystone.config only: the device surface and a busybox init.
#
# Needs: linux-source-6.1 flex bison bc libelf-dev libssl-dev (Debian).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
variant=sandbox
if [ "${1:-}" = "--variant" ]; then variant="${2:?--variant needs a name}"; shift 2; fi
cache_root="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/keystone/kernel}"
case "$variant" in
  sandbox)  fragments=("$here/keystone.config" "$here/sandbox.config") ;;
  minimal)  fragments=("$here/keystone.config") ;;
  *) echo "error: unknown kernel variant '$variant' (sandbox, minimal)" >&2; exit 2 ;;
esac
tarball=/usr/src/linux-source-6.1.tar.xz
[ -r "$tarball" ] || { echo "error: $tarball missing: apt-get install linux-source-6.1" >&2; exit 1; }
for f in "${fragments[@]}"; do
  [ -r "$f" ] || { echo "error: $f missing" >&2; exit 1; }
done
hash="$( (sha256sum "$tarball" | cut -d' ' -f1; echo "$variant"; cat "${fragments[@]}" "$0") | sha256sum | cut -c1-16)"
out="$cache_root/$variant-$hash"
if [ -s "$out/vmlinux" ] && [ -s "$out/bzImage" ]; then
  echo "$out"; exit 0
fi
start=$(date +%s)
work="$cache_root/build-$variant-$hash"
rm -rf "$work"; mkdir -p "$work"
echo "kernel ($variant): unpacking $tarball" >&2
tar -C "$work" -xf "$tarball"
src="$work/linux-source-6.1"
make -C "$src" -s tinyconfig >&2
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "${fragments[@]}" >/dev/null
make -C "$src" -s olddefconfig >&2
# Every =y line of every fragment must have survived olddefconfig.
for f in "${fragments[@]}"; do
  for opt in $(sed -n 's/^\(CONFIG_[A-Z0-9_]*\)=y$/\1/p' "$f"); do
    grep -q "^$opt=y" "$src/.config" || { echo "error: $opt (from $(basename "$f")) did not stick" >&2; exit 1; }
  done
done
log="$work/build.log"
echo "kernel ($variant): compiling with $(nproc) jobs (about 8 min on 2 cores); log: $log" >&2
make -C "$src" -j"$(nproc)" vmlinux bzImage > "$log" 2>&1 &
mpid=$!
while kill -0 "$mpid" 2>/dev/null; do
  sleep 30
  kill -0 "$mpid" 2>/dev/null && echo "kernel ($variant): $(( $(date +%s) - start )) s, $(grep -c '^ *CC' "$log" || true) files compiled" >&2
done
if ! wait "$mpid"; then tail -30 "$log" >&2; echo "error: kernel build failed; log: $log" >&2; exit 1; fi
mkdir -p "$out.tmp"
cp "$src/vmlinux" "$src/arch/x86/boot/bzImage" "$src/.config" "$out.tmp/"
make -C "$src" -s kernelrelease > "$out.tmp/kernelrelease"
rm -rf "$out"; mv "$out.tmp" "$out"; rm -rf "$work"
echo "kernel ($variant): built in $(( $(date +%s) - start )) s" >&2
echo "$out"
