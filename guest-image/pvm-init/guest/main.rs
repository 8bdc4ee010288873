//! The PVM test init: a static, no-libc Linux x86_64 `/init` (see
//! `src/lib.rs` for what it does and how tests drive it).
//!
//! Runs as PID 1 of the PVM test kernel. It mounts devtmpfs, proc and sysfs,
//! reads `pvminit.*` parameters from /proc/cmdline (the kernel keeps dotted
//! parameters away from init's argv and environment) and runs the listed
//! steps in order, printing one `pvm-init: ...` line per result on fd 1 (the
//! kernel's /dev/console). A failed step prints `pvm-init: FAIL ...` and the
//! run goes on, so the `reboot` step still ends the VM.

#![no_std]
#![no_main]

// The probe guest's memcpy/memset/memcmp/bcmp (single `rep movsb`/`rep
// stosb`, volatile compares): one copy for both freestanding programs.
#[path = "../../probe/guest/mem.rs"]
mod mem;
mod out;
#[allow(dead_code)]
mod shared;
#[allow(dead_code)]
mod sys;

use core::arch::global_asm;

use out::line;

// Entry: the kernel starts us with rsp -> argc, argv[], NULL, envp[], NULL,
// auxv. The stack is 16-byte aligned there; `call` keeps the ABI alignment.
global_asm!(
    ".global _start",
    "_start:",
    "xor ebp, ebp",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {start}",
    "ud2",
    // core is precompiled with unwinding tables that name the personality
    // routine; with panic=abort it is never called.
    ".global rust_eh_personality",
    "rust_eh_personality:",
    "ud2",
    start = sym start,
);

/// The first line (`pvm-init: started`), the marker the tests wait for.
const MARKER: &str = "started";

const DEFAULT_STEPS: &[u8] = b"timer,reboot";

/// A failed step: what failed and the errno.
type StepResult = Result<(), (&'static str, i32)>;

trait Ctx<T> {
    fn ctx(self, what: &'static str) -> Result<T, (&'static str, i32)>;
}

impl<T> Ctx<T> for Result<T, i32> {
    fn ctx(self, what: &'static str) -> Result<T, (&'static str, i32)> {
        self.map_err(|e| (what, e))
    }
}

extern "C" fn start(_sp: *const usize) -> ! {
    line().str(MARKER).uptime().print();
    for (source, target, fstype) in [
        (&b"devtmpfs\0"[..], &b"/dev\0"[..], &b"devtmpfs\0"[..]),
        (b"proc\0", b"/proc\0", b"proc\0"),
        (b"sysfs\0", b"/sys\0", b"sysfs\0"),
    ] {
        let _ = sys::mkdir(target, 0o755);
        if let Err(e) = sys::mount(source, target, fstype) {
            line()
                .str("FAIL mount ")
                .bytes(&target[..target.len() - 1])
                .str(" errno=")
                .dec(e as u64)
                .print();
        }
    }

    let mut cmdline_buf = [0u8; 4096];
    let cmdline = read_file(b"/proc/cmdline\0", &mut cmdline_buf).unwrap_or(&[]);
    let steps = param(cmdline, b"pvminit.steps=").unwrap_or(DEFAULT_STEPS);
    line().str("steps=").bytes(steps).print();

    for step in steps.split(|&b| b == b',').filter(|s| !s.is_empty()) {
        let result = match step {
            b"timer" => timer(),
            b"virtio" => virtio(),
            b"net" => net(),
            b"disk" => disk(cmdline),
            b"write" => write(cmdline),
            b"vsock" => vsock_connect(cmdline),
            b"listen" => vsock_listen(cmdline),
            b"fork" => fork(),
            b"exec" => exec(cmdline),
            b"serve" => serve(cmdline),
            b"reboot" => reboot(),
            _ => {
                line().str("unknown step ").bytes(step).print();
                Ok(())
            }
        };
        if let Err((what, errno)) = result {
            line()
                .str("FAIL ")
                .bytes(step)
                .str(": ")
                .str(what)
                .str(" errno=")
                .dec(errno as u64)
                .print();
        }
    }
    line().str("done, idling").uptime().print();
    loop {
        // pause(2): PID 1 must never exit.
        // SAFETY: no arguments.
        unsafe { sys::call(sys::PAUSE, &[]) };
    }
}

/// The value of `key` (e.g. `b"pvminit.steps="`) on the command line.
fn param<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    cmdline
        .split(|&b| b == b' ' || b == b'\n')
        .find_map(|tok| tok.strip_prefix(key))
}

/// A decimal `key` parameter, or `default`.
fn param_u64(cmdline: &[u8], key: &[u8], default: u64) -> u64 {
    let Some(v) = param(cmdline, key) else {
        return default;
    };
    let mut n: u64 = 0;
    for &c in v {
        if !c.is_ascii_digit() {
            return default;
        }
        n = n.wrapping_mul(10).wrapping_add(u64::from(c - b'0'));
    }
    n
}

/// Reads a whole (small) file into `buf`.
fn read_file<'a>(path: &[u8], buf: &'a mut [u8]) -> Result<&'a [u8], i32> {
    let fd = sys::open(path, sys::O_RDONLY | sys::O_CLOEXEC)?;
    let mut len = 0;
    let result = loop {
        match sys::read(fd, &mut buf[len..]) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                len += n;
                if len == buf.len() {
                    break Ok(());
                }
            }
            Err(e) => break Err(e),
        }
    };
    sys::close(fd);
    result.map(|()| &buf[..len])
}

/// Joins `parts` into `buf` with a trailing NUL; returns the path with it.
fn path<'a>(buf: &'a mut [u8; 256], parts: &[&[u8]]) -> &'a [u8] {
    let mut len = 0;
    for p in parts {
        let n = p.len().min(buf.len() - 1 - len);
        buf[len..len + n].copy_from_slice(&p[..n]);
        len += n;
    }
    buf[len] = 0;
    &buf[..=len]
}

fn trim(b: &[u8]) -> &[u8] {
    let end = b
        .iter()
        .rposition(|&c| c > b' ')
        .map_or(0, |i| i + 1);
    &b[..end]
}

/// `timer`: byte 123 to the boot timer (MMIO 0xc000_0000) through /dev/mem.
fn timer() -> StepResult {
    const BOOT_TIMER: u64 = 0xc000_0000;
    let fd = sys::open(b"/dev/mem\0", sys::O_RDWR | sys::O_SYNC | sys::O_CLOEXEC).ctx("open /dev/mem")?;
    let page = sys::mmap_shared(fd, 4096, BOOT_TIMER).ctx("mmap /dev/mem");
    sys::close(fd);
    let page = page?;
    // SAFETY: `page` is a fresh 4 KiB shared mapping of the boot timer's
    // MMIO page; a volatile byte store is one MMIO write.
    unsafe { core::ptr::write_volatile(page, 123u8) };
    line().str("boot-timer written").uptime().print();
    Ok(())
}

/// `virtio`: each virtio device Linux found, its device id and the driver
/// bound to it (from sysfs).
fn virtio() -> StepResult {
    let mut found = 0;
    for i in 0..16u8 {
        let digits = [b'0' + i / 10, b'0' + i % 10];
        let name: &[u8] = if i < 10 { &digits[1..] } else { &digits[..] };
        let mut p = [0u8; 256];
        let mut buf = [0u8; 64];
        let id = match read_file(
            path(&mut p, &[b"/sys/bus/virtio/devices/virtio", name, b"/device"]),
            &mut buf,
        ) {
            Ok(id) => id,
            Err(_) => break,
        };
        let mut link = [0u8; 256];
        let driver = match sys::readlink(
            path(&mut p, &[b"/sys/bus/virtio/devices/virtio", name, b"/driver"]),
            &mut link,
        ) {
            Ok(n) => link[..n].rsplit(|&c| c == b'/').next().unwrap_or(b""),
            Err(_) => &b"(none)"[..],
        };
        line()
            .str("virtio")
            .bytes(name)
            .str(" device=")
            .bytes(trim(id))
            .str(" driver=")
            .bytes(driver)
            .print();
        found += 1;
    }
    line().str("virtio devices=").dec(found).print();
    Ok(())
}

/// `net`: the network interfaces and their MAC addresses (from sysfs).
fn net() -> StepResult {
    let fd = sys::open(b"/sys/class/net\0", sys::O_RDONLY | sys::O_DIRECTORY | sys::O_CLOEXEC)
        .ctx("open /sys/class/net")?;
    let mut dents = [0u8; 2048];
    let n = sys::getdents64(fd, &mut dents).ctx("getdents64");
    sys::close(fd);
    let n = n?;
    let mut off = 0;
    while off + 19 < n {
        // struct linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name.
        let reclen = usize::from(u16::from_ne_bytes([dents[off + 16], dents[off + 17]]));
        if reclen == 0 {
            break;
        }
        let name_all = &dents[off + 19..(off + reclen).min(n)];
        let name = &name_all[..name_all.iter().position(|&c| c == 0).unwrap_or(name_all.len())];
        off += reclen;
        if name == b"." || name == b".." {
            continue;
        }
        let mut p = [0u8; 256];
        let mut buf = [0u8; 64];
        let addr = read_file(path(&mut p, &[b"/sys/class/net/", name, b"/address"]), &mut buf)
            .unwrap_or(b"?");
        line()
            .str("netdev ")
            .bytes(name)
            .str(" address=")
            .bytes(trim(addr))
            .print();
    }
    Ok(())
}

/// `disk`: FNV-1a 64 of the first `pvminit.sectors` (default 8) sectors of
/// /dev/vda, and the disk's size in sectors.
fn disk(cmdline: &[u8]) -> StepResult {
    let sectors = param_u64(cmdline, b"pvminit.sectors=", 8).min(64) as usize;
    let mut size_buf = [0u8; 32];
    let size = read_file(b"/sys/block/vda/size\0", &mut size_buf).unwrap_or(b"?");
    let fd = sys::open(b"/dev/vda\0", sys::O_RDONLY | sys::O_CLOEXEC).ctx("open /dev/vda")?;
    let mut buf = [0u8; 64 * shared::SECTOR_SIZE];
    let want = sectors * shared::SECTOR_SIZE;
    let mut got = 0;
    while got < want {
        match sys::pread(fd, &mut buf[got..want], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => {
                sys::close(fd);
                return Err(("read /dev/vda", e));
            }
        }
    }
    sys::close(fd);
    line()
        .str("disk vda size=")
        .bytes(trim(size))
        .str(" read=")
        .dec(got as u64)
        .str(" fnv1a64=")
        .hex64(shared::fnv1a64(&buf[..got]))
        .print();
    Ok(())
}

/// `write`: [`shared::write_pattern`] to sector `pvminit.write_sector`
/// (default 1) of /dev/vda, then fsync.
fn write(cmdline: &[u8]) -> StepResult {
    let sector = param_u64(cmdline, b"pvminit.write_sector=", 1);
    let fd = sys::open(b"/dev/vda\0", sys::O_RDWR | sys::O_CLOEXEC).ctx("open /dev/vda")?;
    let data = shared::write_pattern(sector);
    let r = sys::pwrite(fd, &data, sector * shared::SECTOR_SIZE as u64)
        .ctx("pwrite /dev/vda")
        .and_then(|n| {
            if n == data.len() {
                Ok(())
            } else {
                Err(("short pwrite", 5))
            }
        })
        .and_then(|()| sys::fsync(fd).ctx("fsync /dev/vda").map(|_| ()));
    sys::close(fd);
    r?;
    line().str("disk wrote sector=").dec(sector).str(" fsync ok").print();
    Ok(())
}

/// Reads from `fd` until a newline, EOF or a full buffer.
fn read_line(fd: usize, buf: &mut [u8]) -> Result<usize, i32> {
    let mut len = 0;
    while len < buf.len() {
        let n = sys::read(fd, &mut buf[len..])?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].contains(&b'\n') {
            break;
        }
    }
    Ok(len)
}

/// `vsock`: connect to the host (CID 2) on `pvminit.vsock_port` (default
/// 5000), send [`shared::VSOCK_GREETING`], print the reply line.
fn vsock_connect(cmdline: &[u8]) -> StepResult {
    let port = param_u64(cmdline, b"pvminit.vsock_port=", 5000) as u32;
    let fd = sys::socket(sys::AF_VSOCK, sys::SOCK_STREAM).ctx("socket AF_VSOCK")?;
    let r = (|| {
        sys::connect_vsock(fd, &sys::SockaddrVm::new(sys::VMADDR_CID_HOST, port)).ctx("connect")?;
        line().str("vsock connected cid=2 port=").dec(u64::from(port)).print();
        sys::write_all(fd, shared::VSOCK_GREETING.as_bytes()).ctx("write")?;
        let mut buf = [0u8; 256];
        let n = read_line(fd, &mut buf).ctx("read")?;
        line().str("vsock reply: ").bytes(&buf[..n]).print();
        Ok(())
    })();
    sys::close(fd);
    r
}

/// `listen`: listen on `pvminit.listen_port` (default 6000), accept one
/// host-initiated connection, read a line and send it back.
fn vsock_listen(cmdline: &[u8]) -> StepResult {
    let port = param_u64(cmdline, b"pvminit.listen_port=", 6000) as u32;
    let fd = sys::socket(sys::AF_VSOCK, sys::SOCK_STREAM).ctx("socket AF_VSOCK")?;
    let r = (|| {
        sys::bind_vsock(fd, &sys::SockaddrVm::new(sys::VMADDR_CID_ANY, port)).ctx("bind")?;
        sys::listen(fd, 1).ctx("listen")?;
        line().str("vsock listening port=").dec(u64::from(port)).print();
        let conn = sys::accept(fd).ctx("accept")?;
        let mut buf = [0u8; 256];
        let r = read_line(conn, &mut buf)
            .ctx("read")
            .and_then(|n| sys::write_all(conn, &buf[..n]).ctx("write").map(|()| n));
        sys::close(conn);
        let n = r?;
        line().str("vsock served: ").bytes(&buf[..n]).print();
        Ok(())
    })();
    sys::close(fd);
    r
}

/// `fork`: a child prints its line and exits 7; the parent waits for it.
fn fork() -> StepResult {
    match sys::fork().ctx("fork")? {
        0 => {
            line().str("fork child running").print();
            sys::exit(7)
        }
        pid => {
            let (got, status) = sys::wait(pid).ctx("wait4")?;
            line()
                .str("fork ok child=")
                .dec(got as u64)
                .str(" exit=")
                .dec(((status >> 8) & 0xff) as u64)
                .uptime()
                .print();
            Ok(())
        }
    }
}

/// `exec`: fork, run `pvminit.exec=PATH[,ARG]...` in the child, wait for it.
fn exec(cmdline: &[u8]) -> StepResult {
    let spec = param(cmdline, b"pvminit.exec=").ok_or(("no pvminit.exec=", 22))?;
    line().str("exec ").bytes(spec).uptime().print();
    let status = run(spec, None)?;
    line()
        .str("exec exited status=")
        .dec(((status >> 8) & 0xff) as u64)
        .str(" signal=")
        .dec((status & 0x7f) as u64)
        .uptime()
        .print();
    Ok(())
}

/// `serve`: listen on vsock port `pvminit.serve_port=` (default 22); for
/// each of `pvminit.serve_count=` (default 1) connections in turn, run
/// `pvminit.serve=PATH[,ARG]...` inetd style (e.g. `dropbear -i`) and wait
/// for it. The program gets a Unix socket as stdin and stdout and the init
/// relays between it and the vsock connection: glibc's getnameinfo() knows
/// no AF_VSOCK, and `dropbear -i` exits when it cannot name its peer.
fn serve(cmdline: &[u8]) -> StepResult {
    let spec = param(cmdline, b"pvminit.serve=").ok_or(("no pvminit.serve=", 22))?;
    let port = param_u64(cmdline, b"pvminit.serve_port=", 22) as u32;
    let count = param_u64(cmdline, b"pvminit.serve_count=", 1);
    let fd = sys::socket(sys::AF_VSOCK, sys::SOCK_STREAM).ctx("socket AF_VSOCK")?;
    let r = (|| {
        sys::bind_vsock(fd, &sys::SockaddrVm::new(sys::VMADDR_CID_ANY, port)).ctx("bind")?;
        sys::listen(fd, 4).ctx("listen")?;
        line()
            .str("serve listening port=")
            .dec(u64::from(port))
            .uptime()
            .print();
        for _ in 0..count {
            let conn = sys::accept(fd).ctx("accept")?;
            line().str("serve connection: ").bytes(spec).uptime().print();
            let status = sys::socketpair(sys::AF_UNIX)
                .ctx("socketpair")
                .and_then(|(ours, theirs)| {
                    let pid = spawn(spec, Some(theirs));
                    sys::close(theirs);
                    let relayed = pid.and_then(|_| relay(conn, ours));
                    sys::close(ours);
                    let status = sys::wait(pid?).ctx("wait4")?.1;
                    relayed.map(|()| status)
                });
            sys::close(conn);
            let status = status?;
            line()
                .str("serve exited status=")
                .dec(((status >> 8) & 0xff) as u64)
                .str(" signal=")
                .dec((status & 0x7f) as u64)
                .uptime()
                .print();
        }
        Ok(())
    })();
    sys::close(fd);
    r
}

/// Copies bytes both ways between `a` and `b` until both have reached EOF,
/// passing each EOF on as a write shutdown.
fn relay(a: usize, b: usize) -> StepResult {
    let mut open = [true, true]; // still reading from a, from b
    let mut buf = [0u8; 16384];
    while open[0] || open[1] {
        let mut fds = [
            sys::PollFd {
                fd: if open[0] { a as i32 } else { -1 },
                events: sys::POLLIN,
                revents: 0,
            },
            sys::PollFd {
                fd: if open[1] { b as i32 } else { -1 },
                events: sys::POLLIN,
                revents: 0,
            },
        ];
        sys::poll(&mut fds).ctx("poll")?;
        for (i, (from, to)) in [(a, b), (b, a)].into_iter().enumerate() {
            if !open[i] || fds[i].revents & (sys::POLLIN | sys::POLLHUP | sys::POLLERR) == 0 {
                continue;
            }
            match sys::read(from, &mut buf) {
                Ok(n) if n > 0 => {
                    if sys::write_all(to, &buf[..n]).is_err() {
                        open[i] = false;
                    }
                }
                _ => {
                    open[i] = false;
                    sys::shutdown_write(to);
                }
            }
        }
    }
    Ok(())
}

/// Forks and runs `spec` (`PATH[,ARG]...`) in the child, with `stdio` as its
/// fds 0 and 1 when given; returns its wait status.
fn run(spec: &[u8], stdio: Option<usize>) -> Result<i32, (&'static str, i32)> {
    let pid = spawn(spec, stdio)?;
    Ok(sys::wait(pid).ctx("wait4")?.1)
}

/// Forks and runs `spec` (`PATH[,ARG]...`) in the child, with `stdio` as its
/// fds 0 and 1 when given; returns the child's pid.
fn spawn(spec: &[u8], stdio: Option<usize>) -> Result<usize, (&'static str, i32)> {
    // NUL-terminated copies of PATH and each ARG.
    let mut strings = [0u8; 512];
    let n = spec.len().min(strings.len() - 1);
    strings[..n].copy_from_slice(&spec[..n]);
    let mut argv: [*const u8; 16] = [core::ptr::null(); 16];
    let mut argc = 0;
    let mut begin = 0;
    for i in 0..=n {
        if i == n || strings[i] == b',' {
            strings[i] = 0;
            if argc < argv.len() - 1 {
                argv[argc] = strings[begin..].as_ptr();
                argc += 1;
            }
            begin = i + 1;
        }
    }
    let envp: [*const u8; 4] = [
        b"PATH=/bin:/sbin:/usr/bin:/usr/sbin\0".as_ptr(),
        b"HOME=/\0".as_ptr(),
        b"TERM=dumb\0".as_ptr(),
        core::ptr::null(),
    ];
    let path_len = strings.iter().position(|&c| c == 0).unwrap_or(0);
    match sys::fork().ctx("fork")? {
        0 => {
            if let Some(fd) = stdio {
                let _ = sys::dup2(fd, 0);
                let _ = sys::dup2(fd, 1);
                if fd > 1 {
                    sys::close(fd);
                }
            }
            let errno = sys::execve(&strings[..=path_len], &argv[..=argc], &envp);
            line().str("FAIL exec: execve errno=").dec(errno as u64).print();
            sys::exit(127)
        }
        pid => Ok(pid),
    }
}

/// `reboot`: sync, then reboot(2) RESTART (the i8042 reset with
/// `reboot=k`): keystone-vmm exits 0.
fn reboot() -> StepResult {
    sys::sync();
    line().str("rebooting").uptime().print();
    Err(("reboot", sys::reboot_restart()))
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut l = line().str("panic");
    if let Some(location) = info.location() {
        l = l
            .str(" at ")
            .str(location.file())
            .str(":")
            .dec(u64::from(location.line()));
    }
    l.print();
    sys::exit(101)
}
