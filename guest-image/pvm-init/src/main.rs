//! Writes the PVM test initramfs (newc cpio, `/init` = the PVM test init)
//! to the path given, for manual runs; more files with `--file
//! HOST_PATH=GUEST_PATH` (directories above it are made, mode kept) and
//! `--symlink GUEST_PATH=TARGET`:
//!
//! ```sh
//! cargo run -q -p keystone-pvm-init -- /tmp/pvm-init.cpio
//! keystone-vmm --kernel "$KERNEL_DIR/vmlinux" --initrd /tmp/pvm-init.cpio --memory 128 \
//!   --cmdline "console=ttyS0 reboot=k panic=1 noxsave clearcpuid=popcnt,cx16,smap,smep,erms,fsrm,rep_good nopti nokaslr percpu_alloc=page pvminit.steps=timer,virtio,fork,reboot" \
//!   --boot-timer
//! ```
//!
//! Without an argument it prints the path of the init ELF.
//!
//! dropbear over vsock (what docs/pvm-notes.md reports): copy
//! `/usr/sbin/dropbear`, `/lib64/ld-linux-x86-64.so.2` and each library
//! `ldd` names, `/bin/busybox` (plus a `bin/sh` symlink), an ed25519 host
//! key from `dropbearkey` as `etc/dropbear/dropbear_ed25519_host_key`,
//! `etc/passwd` (`root:x:0:0:root:/root:/bin/sh`), `etc/group`,
//! `etc/shells` and the client's public key as `root/.ssh/authorized_keys`;
//! boot with `--vsock 3,UDS` and `pvminit.steps=timer,serve,reboot
//! pvminit.serve=/usr/sbin/dropbear,-i,-s,-m,-r,/etc/dropbear/dropbear_ed25519_host_key`;
//! then `ssh -T -o ProxyCommand=...` with a proxy that writes `CONNECT 22\n`
//! to UDS, reads the `OK` line and relays stdin/stdout.

use std::os::unix::fs::PermissionsExt;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(out) = args.next() else {
        println!("{}", keystone_pvm_init::elf_path().display());
        return;
    };
    let mut fs = keystone_pvm_init::Initramfs::new();
    while let Some(flag) = args.next() {
        let spec = args
            .next()
            .unwrap_or_else(|| fail(&format!("{flag} needs a value")));
        let (a, b) = spec
            .split_once('=')
            .unwrap_or_else(|| fail(&format!("{flag} {spec}: expected A=B")));
        match flag.as_str() {
            "--file" => {
                let data = std::fs::read(a).unwrap_or_else(|e| fail(&format!("{a}: {e}")));
                let mode = std::fs::metadata(a).map_or(0o644, |m| m.permissions().mode());
                fs.file(b, mode, &data);
            }
            "--symlink" => {
                fs.symlink(a, b);
            }
            _ => fail(&format!("unknown option {flag}")),
        }
    }
    if let Err(e) = std::fs::write(&out, fs.finish()) {
        fail(&format!("cannot write {out}: {e}"));
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("keystone-pvm-init: {msg}");
    std::process::exit(2)
}
