//! Bounded host logs for what a guest can make the host write: each
//! sandbox's `supervisor.log` and `vmm.log` rotate at [`LOG_CAP`] (one old
//! generation, `<log>.1`, so a sandbox's logs never take more than twice
//! that), and log lines a guest triggers (readiness attempts, commit pings
//! and the syncs they start) go through a token bucket ([`GuestLines`]) so
//! a guest looping on them costs the host a summary line, not a line each.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Size at which a sandbox log is rotated to `<log>.1`.
pub const LOG_CAP: u64 = 8 << 20;
/// Guest-triggered lines allowed in a burst.
pub const GUEST_LINES_BURST: u32 = 20;
/// After the burst, one guest-triggered line per this interval.
pub const GUEST_LINES_EVERY: Duration = Duration::from_secs(10);

/// An append-only log file that is renamed to `<path>.1` (replacing the
/// older one) and started afresh before a write would take it past its cap.
pub struct RotatingLog {
    path: PathBuf,
    cap: u64,
    file: File,
    /// Also keep the process's stdout and stderr pointing at the current
    /// file, so child processes and panics land in it too.
    onto_stdio: bool,
}

fn open_append(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

impl RotatingLog {
    /// Opens (appending to) the log at `path`.
    pub fn open(path: &Path, cap: u64) -> io::Result<RotatingLog> {
        Ok(RotatingLog {
            path: path.to_path_buf(),
            cap,
            file: open_append(path)?,
            onto_stdio: false,
        })
    }

    /// Points the process's stdout and stderr at the log now and after
    /// every rotation.
    pub fn onto_stdio(mut self) -> io::Result<RotatingLog> {
        dup_onto_stdio(&self.file)?;
        self.onto_stdio = true;
        Ok(self)
    }

    /// The `<path>.1` name of the previous generation.
    pub fn old_path(path: &Path) -> PathBuf {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        PathBuf::from(old)
    }

    /// Appends `bytes`, rotating first when the file (including what other
    /// writers of the same file appended) would pass the cap.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let size = self.file.metadata()?.len();
        if size > 0 && size.saturating_add(bytes.len() as u64) > self.cap {
            std::fs::rename(&self.path, Self::old_path(&self.path))?;
            self.file = open_append(&self.path)?;
            if self.onto_stdio {
                dup_onto_stdio(&self.file)?;
            }
        }
        // One line longer than the cap is cut: a log is for reading.
        let n = bytes
            .len()
            .min(usize::try_from(self.cap).unwrap_or(usize::MAX));
        self.file.write_all(&bytes[..n])
    }

    /// Copies `r` into the log until end of file, a chunk at a time (for a
    /// child's stderr pipe).
    pub fn copy_from(&mut self, mut r: impl Read) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => self.write(&buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

fn dup_onto_stdio(file: &File) -> io::Result<()> {
    for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: dup2 takes no pointers; `file` keeps its descriptor open
        // for the call, and replacing stdout/stderr is its purpose.
        if unsafe { libc::dup2(file.as_raw_fd(), fd) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A token bucket for log lines a guest can trigger at will.
pub struct GuestLines {
    tokens: u32,
    last_refill: Instant,
    suppressed: u64,
}

impl GuestLines {
    /// A full bucket at `now`.
    pub fn new(now: Instant) -> GuestLines {
        GuestLines {
            tokens: GUEST_LINES_BURST,
            last_refill: now,
            suppressed: 0,
        }
    }

    /// Whether a line may be written at `now`; when it may, also how many
    /// were suppressed since the last one written (for the line to say).
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.last_refill);
        let earned = elapsed.as_nanos() / GUEST_LINES_EVERY.as_nanos();
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(earned).min(GUEST_LINES_BURST);
            self.last_refill += GUEST_LINES_EVERY * earned.min(1 << 20);
            if self.tokens == GUEST_LINES_BURST {
                self.last_refill = now;
            }
        }
        if self.tokens == 0 {
            self.suppressed += 1;
            return None;
        }
        self.tokens -= 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("keystone-logs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_log_rotates_at_its_cap_and_keeps_one_old_generation() {
        let dir = temp_dir("rotate");
        let path = dir.join("vmm.log");
        let mut log = RotatingLog::open(&path, 100).unwrap();
        for i in 0..1000 {
            log.write(format!("line {i:04}\n").as_bytes()).unwrap();
        }
        let now = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(RotatingLog::old_path(&path)).unwrap();
        assert!(
            now.len() <= 100 && old.len() <= 100,
            "{} {}",
            now.len(),
            old.len()
        );
        assert!(now.ends_with("line 0999\n"), "the newest lines are kept");
        assert!(old.ends_with(&format!("line {:04}\n", 999 - now.lines().count())));
        let files = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(files, 2);
        // A flood through a pipe (a child's stderr) is bounded the same way.
        let flood = vec![b'x'; 10_000];
        log.copy_from(&flood[..]).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() <= 100);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn guest_lines_are_a_burst_then_one_per_interval_with_a_count() {
        let t0 = Instant::now();
        let mut b = GuestLines::new(t0);
        for _ in 0..GUEST_LINES_BURST {
            assert_eq!(b.allow(t0), Some(0));
        }
        for _ in 0..500 {
            assert_eq!(b.allow(t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(b.allow(t0 + GUEST_LINES_EVERY), Some(500));
        assert_eq!(b.allow(t0 + GUEST_LINES_EVERY), None);
        // A guest looping for an hour gets ~360 lines, not millions.
        let mut written = 0;
        for ms in (0..3_600_000u64).step_by(10) {
            if b.allow(t0 + GUEST_LINES_EVERY + Duration::from_millis(ms))
                .is_some()
            {
                written += 1;
            }
        }
        assert!((355..=365).contains(&written), "{written}");
        // Quiet for long enough, the burst is back.
        let later = t0 + Duration::from_secs(7200);
        for _ in 0..GUEST_LINES_BURST {
            assert!(b.allow(later).is_some());
        }
        assert!(b.allow(later).is_none());
    }
}
