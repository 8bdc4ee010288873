#!/usr/bin/env bash
# Build the smoke image: our guest kernel (bzImage and vmlinux) plus a
# busybox initramfs whose init prints a marker and reboots. Output: DIR with
# bzImage, vmlinux, initramfs.cpio.gz, cmdline.
#
#   guest-image/smoke/build-smoke.sh DIR
#
# Needs busybox-static and cpio (Debian), and the kernel build's packages.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: build-smoke.sh DIR}"
kdir="$("$here/../kernel/build-kernel.sh")"
bb=/bin/busybox
[ -x "$bb" ] || { echo "error: $bb missing: apt-get install busybox-static" >&2; exit 1; }
file "$bb" 2>/dev/null | grep -q "statically linked" || ldd "$bb" 2>&1 | grep -q "not a dynamic" \
  || { echo "error: $bb is not static: apt-get install busybox-static" >&2; exit 1; }
root="$(mktemp -d)"; trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,proc,dev,sys}
cp "$bb" "$root/bin/busybox"
install -m 0755 "$here/init" "$root/init"
mkdir -p "$out"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$out/initramfs.cpio.gz.tmp"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
cp "$kdir/bzImage" "$kdir/vmlinux" "$out/"
echo "console=ttyS0 reboot=k panic=1 pci=off acpi=off nomodule i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd rdinit=/init" > "$out/cmdline"
du -sh "$out"/* >&2
echo "$out"
