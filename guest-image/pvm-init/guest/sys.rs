//! Linux x86_64 system calls through raw `syscall` instructions: number in
//! rax, arguments in rdi rsi rdx r10 r8 r9, result in rax (-errno on
//! failure); the instruction clobbers rcx and r11.

use core::arch::asm;

pub const READ: usize = 0;
pub const WRITE: usize = 1;
pub const OPEN: usize = 2;
pub const CLOSE: usize = 3;
pub const POLL: usize = 7;
pub const DUP2: usize = 33;
pub const PAUSE: usize = 34;
pub const MMAP: usize = 9;
pub const PREAD64: usize = 17;
pub const PWRITE64: usize = 18;
pub const SOCKET: usize = 41;
pub const CONNECT: usize = 42;
pub const SHUTDOWN: usize = 48;
pub const BIND: usize = 49;
pub const LISTEN: usize = 50;
pub const SOCKETPAIR: usize = 53;
pub const FORK: usize = 57;
pub const EXECVE: usize = 59;
pub const EXIT: usize = 60;
pub const WAIT4: usize = 61;
pub const FSYNC: usize = 74;
pub const MKDIR: usize = 83;
pub const READLINK: usize = 89;
pub const SYNC: usize = 162;
pub const MOUNT: usize = 165;
pub const REBOOT: usize = 169;
pub const GETDENTS64: usize = 217;
pub const CLOCK_GETTIME: usize = 228;
pub const ACCEPT4: usize = 288;

pub const O_RDONLY: usize = 0;
pub const O_RDWR: usize = 2;
pub const O_DIRECTORY: usize = 0o200000;
pub const O_SYNC: usize = 0o4010000;
pub const O_CLOEXEC: usize = 0o2000000;

pub const PROT_READ: usize = 1;
pub const PROT_WRITE: usize = 2;
pub const MAP_SHARED: usize = 1;

pub const AF_UNIX: usize = 1;
pub const AF_VSOCK: usize = 40;
pub const SOCK_STREAM: usize = 1;
pub const VMADDR_CID_ANY: u32 = u32::MAX;
pub const VMADDR_CID_HOST: u32 = 2;

pub const LINUX_REBOOT_MAGIC1: usize = 0xfee1_dead;
pub const LINUX_REBOOT_MAGIC2: usize = 672_274_793;
pub const LINUX_REBOOT_CMD_RESTART: usize = 0x0123_4567;

pub const CLOCK_BOOTTIME: usize = 7;

/// `struct sockaddr_vm` (linux/vm_sockets.h), 16 bytes.
#[repr(C)]
pub struct SockaddrVm {
    pub family: u16,
    pub reserved1: u16,
    pub port: u32,
    pub cid: u32,
    pub flags: u8,
    pub zero: [u8; 3],
}

impl SockaddrVm {
    pub fn new(cid: u32, port: u32) -> Self {
        SockaddrVm {
            family: AF_VSOCK as u16,
            reserved1: 0,
            port,
            cid,
            flags: 0,
            zero: [0; 3],
        }
    }
}

/// `struct timespec`.
#[repr(C)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: i64,
}

/// A system call with up to six arguments. Returns rax: a non-negative
/// result, or -errno.
///
/// # Safety
/// The arguments must be valid for system call `nr` (pointers to live,
/// large enough buffers).
#[inline(always)]
pub unsafe fn syscall(nr: usize, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: guaranteed by the caller; `syscall` clobbers only rcx, r11
    // and rax, and does not touch our stack.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// `nr` with arguments `args` (the rest zero).
///
/// # Safety
/// As [`syscall`].
pub unsafe fn call(nr: usize, args: &[usize]) -> isize {
    let mut a = [0usize; 6];
    a[..args.len()].copy_from_slice(args);
    // SAFETY: guaranteed by the caller.
    unsafe { syscall(nr, a) }
}

/// `Ok(result)` or `Err(errno)`.
pub fn check(ret: isize) -> Result<usize, i32> {
    if ret < 0 {
        Err(-ret as i32)
    } else {
        Ok(ret as usize)
    }
}

/// open(2) of a NUL-terminated path.
pub fn open(path: &[u8], flags: usize) -> Result<usize, i32> {
    assert!(path.last() == Some(&0));
    // SAFETY: `path` is NUL-terminated and lives across the call.
    check(unsafe { call(OPEN, &[path.as_ptr() as usize, flags, 0]) })
}

pub fn close(fd: usize) {
    // SAFETY: no pointers.
    unsafe { call(CLOSE, &[fd]) };
}

pub fn read(fd: usize, buf: &mut [u8]) -> Result<usize, i32> {
    // SAFETY: `buf` is writable for its length.
    check(unsafe { call(READ, &[fd, buf.as_mut_ptr() as usize, buf.len()]) })
}

pub fn write(fd: usize, buf: &[u8]) -> Result<usize, i32> {
    // SAFETY: `buf` is readable for its length.
    check(unsafe { call(WRITE, &[fd, buf.as_ptr() as usize, buf.len()]) })
}

/// Writes all of `buf` (short writes are retried).
pub fn write_all(fd: usize, mut buf: &[u8]) -> Result<(), i32> {
    while !buf.is_empty() {
        let n = write(fd, buf)?;
        if n == 0 {
            return Err(5); // EIO
        }
        buf = &buf[n..];
    }
    Ok(())
}

pub fn pread(fd: usize, buf: &mut [u8], offset: u64) -> Result<usize, i32> {
    // SAFETY: `buf` is writable for its length.
    check(unsafe {
        call(
            PREAD64,
            &[fd, buf.as_mut_ptr() as usize, buf.len(), offset as usize],
        )
    })
}

pub fn pwrite(fd: usize, buf: &[u8], offset: u64) -> Result<usize, i32> {
    // SAFETY: `buf` is readable for its length.
    check(unsafe {
        call(
            PWRITE64,
            &[fd, buf.as_ptr() as usize, buf.len(), offset as usize],
        )
    })
}

pub fn fsync(fd: usize) -> Result<usize, i32> {
    // SAFETY: no pointers.
    check(unsafe { call(FSYNC, &[fd]) })
}

pub fn mkdir(path: &[u8], mode: usize) -> Result<usize, i32> {
    assert!(path.last() == Some(&0));
    // SAFETY: `path` is NUL-terminated.
    check(unsafe { call(MKDIR, &[path.as_ptr() as usize, mode]) })
}

/// mount(2); every string NUL-terminated.
pub fn mount(source: &[u8], target: &[u8], fstype: &[u8]) -> Result<usize, i32> {
    for s in [source, target, fstype] {
        assert!(s.last() == Some(&0));
    }
    // SAFETY: NUL-terminated strings; no data argument.
    check(unsafe {
        call(
            MOUNT,
            &[
                source.as_ptr() as usize,
                target.as_ptr() as usize,
                fstype.as_ptr() as usize,
                0,
                0,
            ],
        )
    })
}

pub fn readlink(path: &[u8], buf: &mut [u8]) -> Result<usize, i32> {
    assert!(path.last() == Some(&0));
    // SAFETY: NUL-terminated path; `buf` writable for its length.
    check(unsafe {
        call(
            READLINK,
            &[path.as_ptr() as usize, buf.as_mut_ptr() as usize, buf.len()],
        )
    })
}

pub fn getdents64(fd: usize, buf: &mut [u8]) -> Result<usize, i32> {
    // SAFETY: `buf` writable for its length.
    check(unsafe { call(GETDENTS64, &[fd, buf.as_mut_ptr() as usize, buf.len()]) })
}

pub fn socket(domain: usize, ty: usize) -> Result<usize, i32> {
    // SAFETY: no pointers.
    check(unsafe { call(SOCKET, &[domain, ty | O_CLOEXEC, 0]) })
}

pub fn connect_vsock(fd: usize, addr: &SockaddrVm) -> Result<usize, i32> {
    // SAFETY: `addr` is a live sockaddr_vm of the size passed.
    check(unsafe {
        call(
            CONNECT,
            &[
                fd,
                addr as *const SockaddrVm as usize,
                core::mem::size_of::<SockaddrVm>(),
            ],
        )
    })
}

pub fn bind_vsock(fd: usize, addr: &SockaddrVm) -> Result<usize, i32> {
    // SAFETY: as connect_vsock.
    check(unsafe {
        call(
            BIND,
            &[
                fd,
                addr as *const SockaddrVm as usize,
                core::mem::size_of::<SockaddrVm>(),
            ],
        )
    })
}

pub fn listen(fd: usize, backlog: usize) -> Result<usize, i32> {
    // SAFETY: no pointers.
    check(unsafe { call(LISTEN, &[fd, backlog]) })
}

/// accept4(2) with SOCK_CLOEXEC: children started later do not inherit
/// the connection unless it is dup2'ed to them.
pub fn accept(fd: usize) -> Result<usize, i32> {
    // SAFETY: NULL address and length: the peer's address is not wanted.
    check(unsafe { call(ACCEPT4, &[fd, 0, 0, O_CLOEXEC]) })
}

/// socketpair(2) of stream sockets, both close-on-exec.
pub fn socketpair(domain: usize) -> Result<(usize, usize), i32> {
    let mut sv = [0i32; 2];
    // SAFETY: `sv` is a live int[2].
    check(unsafe {
        call(
            SOCKETPAIR,
            &[domain, SOCK_STREAM | O_CLOEXEC, 0, sv.as_mut_ptr() as usize],
        )
    })?;
    Ok((sv[0] as usize, sv[1] as usize))
}

/// shutdown(fd, SHUT_WR).
pub fn shutdown_write(fd: usize) {
    // SAFETY: no pointers.
    unsafe { call(SHUTDOWN, &[fd, 1]) };
}

pub const POLLIN: i16 = 1;
pub const POLLERR: i16 = 8;
pub const POLLHUP: i16 = 16;

/// `struct pollfd`.
#[repr(C)]
pub struct PollFd {
    pub fd: i32,
    pub events: i16,
    pub revents: i16,
}

/// poll(2) without a timeout.
pub fn poll(fds: &mut [PollFd]) -> Result<usize, i32> {
    // SAFETY: `fds` is a live array of pollfd of the length passed.
    check(unsafe { call(POLL, &[fds.as_mut_ptr() as usize, fds.len(), usize::MAX]) })
}

/// mmap(2) of `len` bytes of `fd` at `offset`, shared, read-write.
pub fn mmap_shared(fd: usize, len: usize, offset: u64) -> Result<*mut u8, i32> {
    // SAFETY: a fresh mapping chosen by the kernel; nothing of ours is
    // replaced.
    let r = check(unsafe {
        call(
            MMAP,
            &[
                0,
                len,
                PROT_READ | PROT_WRITE,
                MAP_SHARED,
                fd,
                offset as usize,
            ],
        )
    })?;
    Ok(r as *mut u8)
}

/// fork(2): `Ok(0)` in the child, `Ok(pid)` in the parent.
pub fn fork() -> Result<usize, i32> {
    // SAFETY: no pointers; the child continues on a copy of this stack.
    check(unsafe { call(FORK, &[]) })
}

/// wait4(pid, &status, 0, NULL): `(pid, status)`.
pub fn wait(pid: usize) -> Result<(usize, i32), i32> {
    let mut status: i32 = 0;
    // SAFETY: `status` is a live i32.
    let r = check(unsafe { call(WAIT4, &[pid, &mut status as *mut i32 as usize, 0, 0]) })?;
    Ok((r, status))
}

pub fn exit(code: i32) -> ! {
    loop {
        // SAFETY: no pointers; does not return.
        unsafe { call(EXIT, &[code as usize]) };
    }
}

/// execve(2); `path` NUL-terminated, `argv` and `envp` NULL-terminated
/// arrays of NUL-terminated strings. Returns only on failure.
pub fn execve(path: &[u8], argv: &[*const u8], envp: &[*const u8]) -> i32 {
    assert!(path.last() == Some(&0));
    assert!(argv.last().is_some_and(|p| p.is_null()));
    assert!(envp.last().is_some_and(|p| p.is_null()));
    // SAFETY: as documented above.
    let r = unsafe {
        call(
            EXECVE,
            &[
                path.as_ptr() as usize,
                argv.as_ptr() as usize,
                envp.as_ptr() as usize,
            ],
        )
    };
    -r as i32
}

/// dup2(2).
pub fn dup2(old: usize, new: usize) -> Result<usize, i32> {
    // SAFETY: no pointers.
    check(unsafe { call(DUP2, &[old, new]) })
}

pub fn sync() {
    // SAFETY: no arguments.
    unsafe { call(SYNC, &[]) };
}

/// reboot(2) with LINUX_REBOOT_CMD_RESTART: the i8042 reset with
/// `reboot=k`. Returns only on failure (errno).
pub fn reboot_restart() -> i32 {
    // SAFETY: no pointers.
    let r = unsafe {
        call(
            REBOOT,
            &[
                LINUX_REBOOT_MAGIC1,
                LINUX_REBOOT_MAGIC2,
                LINUX_REBOOT_CMD_RESTART,
                0,
            ],
        )
    };
    -r as i32
}

/// CLOCK_BOOTTIME in microseconds (time since the kernel started).
pub fn uptime_us() -> u64 {
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `ts` is a live timespec.
    unsafe { call(CLOCK_GETTIME, &[CLOCK_BOOTTIME, &mut ts as *mut Timespec as usize]) };
    (ts.sec as u64) * 1_000_000 + (ts.nsec as u64) / 1000
}
