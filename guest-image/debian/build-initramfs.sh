#!/usr/bin/env bash
# The initramfs of the stock-kernel image: busybox, the modules the sandbox
# contract needs (with their dependencies, from modules.dep) and
# initramfs/init, as an uncompressed newc cpio.
#
#   guest-image/debian/build-initramfs.sh TREE KVER BUSYBOX OUT
#
# TREE holds the unpacked kernel package (lib/modules/KVER, with depmod
# run); BUSYBOX is a static busybox (it also writes the cpio). Needs root
# (the /dev/console node).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tree="${1:?usage: build-initramfs.sh TREE KVER BUSYBOX OUT}"
kver="${2:?}" bb="${3:?}" out="${4:?}"
moddir="$tree/lib/modules/$kver"
[ -f "$moddir/modules.dep" ] || { echo "error: $moddir/modules.dep missing (run depmod)" >&2; exit 1; }

# The contract: block and ext4 for the base image and the sandbox disk,
# overlay for the stack, vsock for ssh and readiness, net for --network,
# packet sockets for DHCP, loop, fuse and autofs4 as the minimal kernel has
# them built in, binfmt_misc for systemd-binfmt; crc32c for ext4's metadata
# checksums.
wanted=(virtio_mmio virtio_blk ext4 crc32c_generic overlay vmw_vsock_virtio_transport
        virtio_net af_packet loop fuse autofs4 binfmt_misc)

declare -A path_of=() done_=()
while IFS=: read -r file _; do
  name="$(basename "$file")"; name="${name%%.ko*}"; name="${name//-/_}"
  path_of[$name]="$file"
done < "$moddir/modules.dep"
order=()
load() {
  local m="${1//-/_}" file deps d
  [ -z "${done_[$m]:-}" ] || return 0
  done_[$m]=1
  file="${path_of[$m]:-}"
  if [ -z "$file" ]; then
    if grep -q "/${m}.ko" "$moddir/modules.builtin" 2>/dev/null || grep -q "/${1}.ko" "$moddir/modules.builtin" 2>/dev/null; then
      return 0 # built in
    fi
    echo "error: module $1 is neither in modules.dep nor built in ($kver)" >&2; exit 1
  fi
  deps="$(grep -m1 "^${file}:" "$moddir/modules.dep" | cut -d: -f2)"
  for d in $deps; do
    d="$(basename "$d")"; load "${d%%.ko*}"
  done
  order+=("$file")
}
for m in "${wanted[@]}"; do load "$m"; done

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,dev,proc,newroot,lib/modules}
cp "$bb" "$stage/bin/busybox"
ln -s busybox "$stage/bin/sh"
mknod -m 600 "$stage/dev/console" c 5 1
install -m 0755 "$here/initramfs/init" "$stage/init"
: > "$stage/modules.order"
for f in "${order[@]}"; do
  flat="$(basename "$f")"
  case "$f" in
    *.ko.xz) xz -dc "$moddir/$f" > "$stage/lib/modules/${flat%.xz}"; flat="${flat%.xz}" ;;
    *.ko.zst) zstd -qdc "$moddir/$f" > "$stage/lib/modules/${flat%.zst}"; flat="${flat%.zst}" ;;
    *) cp "$moddir/$f" "$stage/lib/modules/$flat" ;;
  esac
  echo "$flat" >> "$stage/modules.order"
done
( cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | "$bb" cpio -o -H newc 2>/dev/null ) > "$out.tmp"
mv "$out.tmp" "$out"
echo "initramfs: ${#order[@]} modules ($(tr '\n' ' ' < "$stage/modules.order")), $(( $(stat -c %s "$out") / 1024 )) KiB" >&2
