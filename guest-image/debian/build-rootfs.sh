#!/usr/bin/env bash
# Build the Debian sandbox root filesystem: debootstrap (minbase) + the
# packages in packages.txt + the files in ../rootfs, turned into a read-only
# ext4 image with `mkfs.ext4 -d`. Needs root (debootstrap, chroot) and the
# Debian package mirror; nothing else from the network.
#
#   guest-image/debian/build-rootfs.sh [--stock-kernel] OUT_DIR [MIRROR]
#
# Writes OUT_DIR/rootfs.ext4 and OUT_DIR/versions (key=value lines). With
# --stock-kernel it also takes Debian's own kernel from the mirror
# (linux-image-amd64's current package, unpacked, never installed into the
# image) and writes OUT_DIR/vmlinuz and OUT_DIR/initrd.img
# (build-initramfs.sh): nothing is compiled but the boot-timer helper. The
# caller (`keystone image build`) caches OUT_DIR by the hash of its inputs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
stock=0
if [ "${1:-}" = "--stock-kernel" ]; then stock=1; shift; fi
out="${1:?usage: build-rootfs.sh [--stock-kernel] OUT_DIR [MIRROR]}"
mirror="${2:-${KEYSTONE_DEBIAN_MIRROR:-http://deb.debian.org/debian}}"
suite=bookworm
[ "$(id -u)" = 0 ] || { echo "error: build-rootfs.sh needs root (debootstrap, chroot): run it with sudo" >&2; exit 1; }
for tool in debootstrap mkfs.ext4 gcc; do
  command -v "$tool" >/dev/null || { echo "error: $tool missing: apt-get install debootstrap e2fsprogs gcc libc6-dev" >&2; exit 1; }
done
if [ "$stock" = 1 ]; then
  depmod="$(command -v depmod || echo /sbin/depmod)"
  [ -x "$depmod" ] || { echo "error: depmod missing: apt-get install kmod" >&2; exit 1; }
fi
mkdir -p "$out"
work="$(mktemp -d "$out/.rootfs.XXXXXX")"
root="$work/root"
cleanup() {
  for m in proc sys dev/pts dev; do umount "$root/$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
t0=$(date +%s)
stage() { echo "rootfs: [$(( $(date +%s) - t0 )) s] $*" >&2; }

pkgs="$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$here/packages.txt" | tr -s '[:space:]' ',' | sed 's/,$//')"
stage "debootstrap $suite (minbase) from $mirror"
debootstrap --variant=minbase --include="$pkgs" "$suite" "$root" "$mirror" > "$work/debootstrap.log" 2>&1 &
dpid=$!
while kill -0 "$dpid" 2>/dev/null; do
  sleep 15
  kill -0 "$dpid" 2>/dev/null && stage "debootstrap: $(grep '^I: ' "$work/debootstrap.log" | tail -n 1 | cut -c4-80)"
done
wait "$dpid" || { tail -20 "$work/debootstrap.log" >&2; echo "error: debootstrap failed" >&2; exit 1; }

stage "installing keystone files"
cp -a --no-preserve=ownership "$here/../rootfs/." "$root/"
chmod 0440 "$root/etc/sudoers.d/keystone"
# The boot-timer helper: one byte to the VMM's boot timer through /dev/mem.
gcc -static -Os -s -o "$root/usr/lib/keystone/boot-timer" "$here/../rootfs-src/boot-timer.c"

stage "configuring"
mount -t proc proc "$root/proc"
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }
in_root useradd --create-home --uid 1000 --user-group --shell /bin/bash --comment "Keystone sandbox" sandbox
# '*': no password can match, yet the account is not locked (sshd refuses
# locked accounts even for key logins).
in_root usermod --password '*' sandbox
in_root sh -c 'echo "keystone" > /etc/hostname'
# Per-sandbox identity is made on first boot, never shared through the base.
rm -f "$root"/etc/ssh/ssh_host_*
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
in_root systemctl enable keystone-setup.service keystone-sshd.socket keystone-ready.service keystone-egress.socket \
  systemd-networkd.service systemd-resolved.service >/dev/null 2>&1
in_root systemctl disable ssh.service ssh.socket >/dev/null 2>&1 || true
for unit in systemd-networkd-wait-online.service getty@tty1.service console-getty.service \
    apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
    systemd-timesyncd.service systemd-pstore.service; do
  rm -f "$root"/etc/systemd/system/*.wants/"$unit"
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
if [ "$stock" = 1 ]; then
  stage "stock kernel: linux-image-amd64 and busybox-static from $mirror (unpacked, not installed)"
  # apt in the chroot needs the host's resolver for the moment.
  resolv="$root/etc/resolv.conf"
  saved="$work/resolv.saved"
  if [ -e "$resolv" ] || [ -L "$resolv" ]; then mv "$resolv" "$saved"; fi
  cp -L /etc/resolv.conf "$resolv"
  fetch() {
    in_root apt-get -q update &&
    kpkg="$(in_root apt-cache depends linux-image-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')" &&
    [ -n "$kpkg" ] &&
    in_root sh -c "mkdir -p /tmp/stock && cd /tmp/stock && apt-get -q download $kpkg busybox-static" &&
    in_root sh -c 'for d in /tmp/stock/*.deb; do dpkg-deb -x "$d" /tmp/stock/tree || exit 1; done' &&
    kversion="$(in_root sh -c "dpkg-deb -f /tmp/stock/${kpkg}_*.deb Version")"
  }
  fetch > "$work/stock.log" 2>&1 || { tail -20 "$work/stock.log" >&2; echo "error: fetching the stock kernel failed" >&2; exit 1; }
  rm -f "$resolv"
  if [ -e "$saved" ] || [ -L "$saved" ]; then mv "$saved" "$resolv"; fi
  tree="$root/tmp/stock/tree"
  kver="$(ls "$tree/lib/modules")"
  [ -f "$tree/boot/vmlinuz-$kver" ] || { echo "error: no vmlinuz-$kver in $kpkg" >&2; exit 1; }
  # The host's depmod (kmod): minbase has none.
  "$depmod" -b "$tree" "$kver"
  stage "initramfs for $kver"
  "$here/build-initramfs.sh" "$tree" "$kver" "$tree/bin/busybox" "$work/initrd.img"
  cp "$tree/boot/vmlinuz-$kver" "$work/vmlinuz"
  cp "$tree/boot/config-$kver" "$work/kernel.config"
  rm -rf "$root/tmp/stock"
fi
umount "$root/proc"

stage "recording versions"
{
  echo "debian=$suite $(cat "$root/etc/debian_version")"
  for p in systemd openssh-server git python3 sudo; do
    echo "$p=$(chroot "$root" dpkg-query -W -f '${Version}' "$p")"
  done
  if [ "$stock" = 1 ]; then
    echo "kernel=$kver"
    echo "linux-image=$kpkg $kversion"
  fi
} > "$work/versions"

stage "trimming"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* "$root"/var/log/*.log \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/cache/debconf/*-old
mkdir -p "$root/mnt/keystone/data" "$root/mnt/keystone/root" "$root/mnt/keystone/base" "$root/workspace"

size_mib=$(( $(du -sm "$root" | cut -f1) * 115 / 100 + 64 ))
stage "mkfs.ext4 -d (${size_mib} MiB, read-only base)"
rm -f "$work/rootfs.ext4"
mkfs.ext4 -q -F -L keystone-base -O ^has_journal -E root_owner=0:0 -d "$root" "$work/rootfs.ext4" "${size_mib}M"
e2fsck -fn "$work/rootfs.ext4" >/dev/null 2>&1 || { echo "error: e2fsck found problems in the new image" >&2; exit 1; }
mv "$work/rootfs.ext4" "$out/rootfs.ext4"
mv "$work/versions" "$out/versions"
if [ "$stock" = 1 ]; then
  mv "$work/vmlinuz" "$work/initrd.img" "$work/kernel.config" "$out/"
fi
stage "done: $out/rootfs.ext4"
