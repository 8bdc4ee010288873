//! The backends behind virtio-net: a stream socket to passt, or a tap
//! device opened through `/dev/net/tun`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::RawFd;
use std::os::unix::net::UnixStream;

// NetError and the limits of the device.
use super::*;

/// Where the guest's frames go.
#[derive(Debug)]
pub enum NetBackend {
    /// A connected stream socket to passt (QEMU stream netdev framing: a
    /// 4-byte big-endian length before each frame).
    Stream(UnixStream),
    /// A tap fd from [`open_tap`] (12-byte vnet header before each frame).
    Tap(File),
}

impl AsRawFd for NetBackend {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            NetBackend::Stream(s) => s.as_raw_fd(),
            NetBackend::Tap(f) => f.as_raw_fd(),
        }
    }
}

impl NetBackend {
    pub(super) fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }

    pub(super) fn is_tap(&self) -> bool {
        matches!(self, NetBackend::Tap(_))
    }

    pub(super) fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            NetBackend::Stream(s) => s.set_nonblocking(true),
            NetBackend::Tap(f) => set_fd_nonblocking(f.as_raw_fd()),
        }
    }

    pub(super) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            NetBackend::Stream(s) => (&*s).read(buf),
            NetBackend::Tap(f) => (&*f).read(buf),
        }
    }

    pub(super) fn write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            NetBackend::Stream(s) => {
                // SAFETY: `buf` is valid for reads of `buf.len()` bytes for
                // the duration of the call, and `s` owns an open socket fd.
                // MSG_NOSIGNAL: a closed peer gives EPIPE, not SIGPIPE.
                let n = unsafe {
                    libc::send(
                        s.as_raw_fd(),
                        buf.as_ptr().cast(),
                        buf.len(),
                        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    // Non-negative and at most `buf.len()`.
                    Ok(n as usize)
                }
            }
            NetBackend::Tap(f) => (&*f).write(buf),
        }
    }
}

fn set_fd_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL on an fd we own reads its flags; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with an integer argument; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags (the rest
/// of the union padded to the size of `struct ifreq` on 64-bit Linux).
#[repr(C)]
pub(super) struct IfReq {
    pub(super) name: [u8; 16],
    pub(super) flags: libc::c_short,
    pub(super) _pad: [u8; 22],
}

/// Whether `name` is a valid, explicit interface name (the kernel's
/// `dev_valid_name`, minus `%` templates whose result we would not know).
pub(super) fn valid_tap_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TAP_NAME_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == b'%' || b == 0 || b.is_ascii_whitespace())
}

/// Opens (creating it if needed, which takes `CAP_NET_ADMIN`) the tap
/// interface `name`: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte vnet
/// header (`virtio_net_hdr_v1`), no offloads; the fd is non-blocking and
/// close-on-exec.
pub fn open_tap(name: &str) -> Result<File, NetError> {
    if !valid_tap_name(name) {
        return Err(NetError::TapName(name.to_string()));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        // O_CLOEXEC is std's default; named for the reader.
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(NetError::TapOpen)?;
    configure_tap(file, name)
}

/// Opens the macvtap link `name` through its character device
/// (`/dev/tap<ifindex>`, which devtmpfs or udev makes) and sets it up as
/// [`open_tap`] does a tap. Returns the fd and the link's MAC address: a
/// macvtap passes the guest only frames for that address, so the guest's
/// NIC must have it.
pub fn open_macvtap(name: &str) -> Result<(File, [u8; 6]), NetError> {
    if !valid_tap_name(name) {
        return Err(NetError::TapName(name.to_string()));
    }
    let sys = std::path::Path::new("/sys/class/net").join(name);
    if !sys.exists() {
        return Err(NetError::NoLink(name.to_string()));
    }
    if !sys.join("macvtap").is_dir() {
        return Err(NetError::NotMacvtap(name.to_string()));
    }
    let read = |f: &str| std::fs::read_to_string(sys.join(f)).unwrap_or_default();
    let not_macvtap = || NetError::NotMacvtap(name.to_string());
    let ifindex: u32 = read("ifindex").trim().parse().map_err(|_| not_macvtap())?;
    let mac = parse_link_mac(read("address").trim()).ok_or_else(not_macvtap)?;
    let path = std::path::PathBuf::from(format!("/dev/tap{ifindex}"));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|source| NetError::MacvtapOpen {
            name: name.to_string(),
            path,
            source,
        })?;
    Ok((configure_tap(file, name)?, mac))
}

/// `aa:bb:cc:dd:ee:ff` as sysfs prints a link's address.
fn parse_link_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for m in mac.iter_mut() {
        let p = parts.next().filter(|p| p.len() == 2)?;
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, the 12-byte vnet header, no
/// offloads, on a tap or macvtap fd (macvtap takes the same three ioctls
/// and ignores the name).
fn configure_tap(file: File, name: &str) -> Result<File, NetError> {
    let fd = file.as_raw_fd();
    let fail = |op: &'static str| NetError::TapIoctl {
        name: name.to_string(),
        op,
        source: io::Error::last_os_error(),
    };

    let mut ifr = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    // At most 15 bytes (checked above): the name stays NUL-terminated.
    ifr.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `ifr` is a
    // properly sized (40 bytes, as large as the kernel's struct on any
    // Linux target), initialized, exclusively borrowed one that lives for
    // the call, and `fd` is an open /dev/net/tun or /dev/tapN fd.
    if unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut ifr as *mut IfReq) } < 0 {
        return Err(fail("TUNSETIFF"));
    }
    let hdr_len = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which
    // points at a live `c_int`; `fd` is an attached tap fd.
    if unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &hdr_len as *const libc::c_int) } < 0 {
        return Err(fail("TUNSETVNETHDRSZ"));
    }
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned
    // long of TUN_F_* flags, none here); no memory is passed.
    if unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
        return Err(fail("TUNSETOFFLOAD"));
    }
    Ok(file)
}
