//! The life-cycle verbs: `start`, `stop`, `status`, `list`, `destroy`.
//!
//! Each is a function from options to a report or an [`AgentError`]
//! (which carries the exit code); printing is left to [`super::cli`].
//!
//! `start` options are remembered: `--memory`, `--vcpus`, `--network`
//! (`--tap`) and `--sync-mode` given once apply to later starts of the same
//! sandbox until given again; `--nested` (nested virtualization, off by
//! default) applies to the boot it is given to.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::disk::{self, DiskError, DiskReport};
use super::session;
use super::snapshot;
use super::state::{
    free_cid, sanitize_name, validate_name, vsock_socket_path, AgentPaths, ImageRef, Launch,
    Network, ProcessId, Registry, Sandbox, Status, SyncMode,
};
use super::vmm_process::{self, STOP_GRACE};
use super::AgentError;
use crate::doctor::HostReport;
use crate::image::{self, Image};
use keystone_vmm::host::KvmFlavor;

/// Default guest memory, MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 8192;
/// Least guest memory `start` accepts, MiB.
pub const MIN_MEMORY_MIB: u64 = 2048;
/// Default vCPUs.
pub const DEFAULT_VCPUS: u8 = 4;
/// Default time to wait for the guest's readiness message.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(180);
/// `--network` as given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkChoice {
    /// User-mode networking (passt).
    User,
    /// An existing tap device (`--tap NAME`).
    Tap,
    /// An existing macvtap link (`--tap NAME`).
    Macvtap,
    /// An existing tap device on a bridge (`--tap NAME`).
    Bridge,
    /// No network.
    None,
    /// Only through the egress proxy, by the sandbox's policy.
    Policy,
}

/// Checks a network interface name (as `ip link` takes it).
fn valid_ifname(name: &str) -> bool {
    (1..16).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name != "."
        && name != ".."
}

/// Turns `--network` and `--tap` into a [`Network`]; `None` if neither was
/// given (keep the sandbox's, or the default).
pub fn resolve_network(
    choice: Option<NetworkChoice>,
    tap: Option<&str>,
) -> Result<Option<Network>, AgentError> {
    let device = |mode: &str| -> Result<String, AgentError> {
        let Some(dev) = tap else {
            if mode == "macvtap" {
                return Err(AgentError::Usage(
                    "--network macvtap needs --tap NAME: a macvtap link you created on a host interface (e.g. `ip link add link eth0 name ksmv0 type macvtap mode bridge && ip link set ksmv0 up`)".into(),
                ));
            }
            return Err(AgentError::Usage(format!(
                "--network {mode} needs --tap NAME: a tap device you created (e.g. `ip tuntap add dev ks0 mode tap user $USER`{})",
                if mode == "bridge" { " and added to the bridge with `ip link set ks0 master br0`" } else { "" }
            )));
        };
        if !valid_ifname(dev) {
            return Err(AgentError::Usage(format!(
                "--tap {}: not an interface name",
                dev.escape_debug()
            )));
        }
        Ok(dev.to_string())
    };
    let network = match (choice, tap) {
        (None, None) => return Ok(None),
        (None | Some(NetworkChoice::Tap), Some(_)) => Network::Tap {
            device: device("tap")?,
        },
        (Some(NetworkChoice::Tap), None) => Network::Tap {
            device: device("tap")?,
        },
        (Some(NetworkChoice::Bridge), _) => Network::Bridge {
            device: device("bridge")?,
        },
        (Some(NetworkChoice::Macvtap), _) => {
            let device = device("macvtap")?;
            check_macvtap(Path::new("/sys/class/net"), Path::new("/dev"), &device)?;
            Network::Macvtap { device }
        }
        (Some(NetworkChoice::User | NetworkChoice::None | NetworkChoice::Policy), Some(_)) => {
            return Err(AgentError::Usage(
                "--tap goes with --network tap, bridge or macvtap".into(),
            ))
        }
        (Some(NetworkChoice::Policy), None) => Network::Policy,
        (Some(NetworkChoice::User), None) => Network::User,
        (Some(NetworkChoice::None), None) => Network::None,
    };
    Ok(Some(network))
}

/// Whether the macvtap link `device` exists (under `sys`, i.e.
/// /sys/class/net), is a macvtap, and its device node (under `dev`) opens
/// read-write for us; else one line saying which, before any boot.
fn check_macvtap(sys: &Path, dev: &Path, device: &str) -> Result<(), AgentError> {
    let link = sys.join(device);
    if !link.exists() {
        return Err(AgentError::Usage(format!(
            "--network macvtap: this host has no interface {device} (create it with `ip link add link eth0 name {device} type macvtap mode bridge && ip link set {device} up`, as root)"
        )));
    }
    if !link.join("macvtap").is_dir() {
        return Err(AgentError::Usage(format!(
            "--network macvtap: {device} is not a macvtap link (use --network tap or bridge for a tap device)"
        )));
    }
    let index = std::fs::read_to_string(link.join("ifindex")).unwrap_or_default();
    let node = dev.join(format!("tap{}", index.trim()));
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&node)
    {
        Ok(_) => Ok(()),
        Err(e) => Err(AgentError::Usage(format!(
            "--network macvtap: cannot open {} ({e}): macvtap needs root, or read-write access to that device",
            node.display()
        ))),
    }
}

/// Options of `start`.
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// The project (default: the current directory).
    pub path: Option<PathBuf>,
    /// The sandbox name (default: from the project directory's name).
    pub name: Option<String>,
    /// Guest memory, MiB (default: the sandbox's, else 8192).
    pub memory_mib: Option<u64>,
    /// vCPUs (default: the sandbox's, else 4).
    pub vcpus: Option<u8>,
    /// Hide VMX/SVM from the guest.
    pub nested: bool,
    /// Make a new disk (stopping the sandbox first if it runs).
    pub fresh: bool,
    /// Boot, even when a snapshot of the last run could be resumed.
    pub cold: bool,
    /// `--network`.
    pub network: Option<NetworkChoice>,
    /// `--tap`.
    pub tap: Option<String>,
    /// `--sync-mode`.
    pub sync_mode: Option<SyncMode>,
}

/// What `start` did.
#[derive(Clone, Debug)]
pub struct Started {
    /// The sandbox as it runs now.
    pub sandbox: Sandbox,
    /// A new disk was made (and what it holds).
    pub new_disk: Option<DiskReport>,
    /// From spawning the supervisor to the readiness message.
    pub boot_time: Duration,
    /// The image's manifest says the guest runs sshd.
    pub ssh: bool,
    /// Resumed from a snapshot instead of booting.
    pub resumed: Option<Resumed>,
    /// A line for a warning (the sandbox runs).
    pub warning: Option<String>,
}

/// What a resuming `start` restored.
#[derive(Clone, Debug)]
pub struct Resumed {
    /// The snapshot's tag.
    pub tag: String,
    /// Where the disk as it was at the stop is kept.
    pub kept_disk: PathBuf,
}

/// The guest image to boot: `$KEYSTONE_GUEST_IMAGE` (a directory), else
/// the cached build of the current image sources, built now when missing
/// (`keystone image build`).
pub fn resolve_image() -> Result<Image, AgentError> {
    image::resolve().map_err(|e| {
        AgentError::Image(format!(
            "guest image: {e} (run `keystone image build`, or set KEYSTONE_GUEST_IMAGE to an image directory)"
        ))
    })
}

/// `$KEYSTONE_READY_TIMEOUT` seconds, else [`DEFAULT_READY_TIMEOUT`].
pub fn ready_timeout() -> Result<Duration, AgentError> {
    match std::env::var("KEYSTONE_READY_TIMEOUT") {
        Err(_) => Ok(DEFAULT_READY_TIMEOUT),
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|&s| s > 0)
            .map(Duration::from_secs)
            .ok_or_else(|| {
                AgentError::Usage(format!(
                    "KEYSTONE_READY_TIMEOUT={}: expected a number of seconds",
                    v.escape_debug()
                ))
            }),
    }
}

/// KVM usable at all (else exit 4).
pub(super) fn check_kvm(report: &HostReport) -> Result<(), AgentError> {
    match &report.kvm_usable {
        Ok(()) => Ok(()),
        Err(e) => Err(AgentError::NoKvm(format!(
            "KVM is not available ({e}): see `keystone doctor`"
        ))),
    }
}

/// KVM able to run this image (else exit 4).
pub(super) fn check_flavor(report: &HostReport, image: &Image) -> Result<(), AgentError> {
    if report.flavor == KvmFlavor::Hardware || image.manifest.pvm_capable {
        return Ok(());
    }
    let what = match report.flavor {
        KvmFlavor::Pvm => {
            "this host's KVM is PVM (kvm_pvm), which cannot run an ordinary Linux guest"
        }
        _ => "this host's CPU shows no vmx/svm, so Linux guests cannot run",
    };
    Err(AgentError::NoKvm(format!(
        "{what}; the image at {} is not PVM-capable (see `keystone doctor`)",
        image.dir.display()
    )))
}

fn cwd() -> Result<PathBuf, AgentError> {
    std::env::current_dir().map_err(|e| AgentError::Internal(format!("current directory: {e}")))
}

/// The project of `path`: its git top level.
fn project_of(path: &Path) -> Result<PathBuf, AgentError> {
    disk::git_toplevel(path).map_err(|e| match e {
        DiskError::NotGitRepo(p) => AgentError::NotGitRepo(p),
        other => AgentError::Disk(other),
    })
}

/// `status`: one sandbox as it is now.
pub fn status(paths: &AgentPaths, name: Option<&str>) -> Result<Sandbox, AgentError> {
    Ok(paths.registry().find(name)?.observed())
}

/// `list`: every sandbox as it is now, by name.
pub fn list(paths: &AgentPaths) -> Result<Vec<Sandbox>, AgentError> {
    Ok(paths.registry().observed()?)
}

/// What [`reserve`] found.
enum Reservation {
    /// The sandbox is ours to start; the record is marked `starting`. With
    /// the supervisor of an earlier run, which may still be cleaning up.
    Reserved(Box<Sandbox>, Option<ProcessId>),
    /// It runs (VMM or supervisor alive).
    Running(Box<Sandbox>),
}

/// Everything `start` decided before reserving.
struct Plan<'a> {
    name: &'a str,
    project: &'a Path,
    opts: &'a StartOptions,
    network: Option<Network>,
    me: Option<ProcessId>,
}

/// Under the registry lock: finds or creates the sandbox and marks it
/// `starting` by us, unless it runs or another `start` is preparing it.
fn reserve(paths: &AgentPaths, plan: &Plan) -> Result<Reservation, AgentError> {
    let reg = paths.registry();
    reg.update(|list| {
        let cid = free_cid(list);
        let existing = list.iter_mut().find(|s| s.name == plan.name);
        let s = match existing {
            Some(s) => {
                if s.project_path != plan.project {
                    return Err(AgentError::NameTaken {
                        name: s.name.clone(),
                        project: s.project_path.clone(),
                    });
                }
                if s.vmm.is_some_and(|p| p.is_alive()) {
                    return Ok(Reservation::Running(Box::new(s.clone())));
                }
                if s.observed_status() == Status::Starting {
                    return Err(AgentError::AlreadyRunning(s.name.clone()));
                }
                s
            }
            None => {
                let dir = paths.sandbox_dir(plan.name);
                list.push(Sandbox::new(plan.name, plan.project, dir, cid)?);
                list.last_mut()
                    .ok_or_else(|| AgentError::Internal("registry push".into()))?
            }
        };
        let o = plan.opts;
        if let Some(m) = o.memory_mib {
            s.memory_mib = m;
        }
        if let Some(v) = o.vcpus {
            s.vcpus = v;
        }
        if let Some(n) = &plan.network {
            s.network = n.clone();
        }
        if let Some(m) = o.sync_mode {
            s.sync_mode = m;
        }
        s.nested = o.nested;
        // The socket only exists while it runs: follow the environment.
        s.vsock_uds = vsock_socket_path(&s.state_dir, &s.name)?;
        let previous = s.supervisor;
        s.status = Status::Starting;
        s.starter = plan.me;
        s.supervisor = None;
        s.vmm = None;
        s.last_error = None;
        Ok(Reservation::Reserved(Box::new(s.clone()), previous))
    })
}

/// Marks a start failed (under the lock) unless someone else took over.
fn mark_failed(reg: &Registry, name: &str, me: Option<ProcessId>, reason: &str) {
    let _ = reg.modify(name, |s| {
        if s.starter == me || s.starter.is_none() {
            s.status = Status::Failed;
            s.last_error = Some(reason.to_string());
            s.starter = None;
        }
    });
}

/// What `start` checked before it touches the registry.
struct Checked {
    name: String,
    project: PathBuf,
    network: Option<Network>,
    timeout: Duration,
    image: Image,
    vmm: PathBuf,
}

/// `start`, phase 1: the options, the host's KVM, the image and the VMM
/// binary, all before anything is recorded.
fn check_start(opts: &StartOptions) -> Result<Checked, AgentError> {
    let path = match &opts.path {
        Some(p) => p.clone(),
        None => cwd()?,
    };
    let project = project_of(&path)?;
    let name = match &opts.name {
        Some(n) => n.clone(),
        None => sanitize_name(
            &project
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
    };
    if opts.name.is_none() && validate_name(&name).is_err() {
        return Err(AgentError::Usage(format!(
            "cannot make a sandbox name from {}: give one with --name",
            project.display()
        )));
    }
    validate_name(&name)?;
    if let Some(m) = opts.memory_mib {
        if m < MIN_MEMORY_MIB {
            return Err(AgentError::Usage(format!(
                "--memory {m}: at least {MIN_MEMORY_MIB} MiB"
            )));
        }
    }
    if opts.vcpus == Some(0) {
        return Err(AgentError::Usage("--vcpus: at least 1".into()));
    }
    let network = resolve_network(opts.network, opts.tap.as_deref())?;
    let timeout = ready_timeout()?;

    let host = HostReport::inspect();
    check_kvm(&host)?;
    let image = resolve_image()?;
    check_flavor(&host, &image)?;
    let vmm = vmm_process::resolve_vmm()?;
    Ok(Checked {
        name,
        project,
        network,
        timeout,
        image,
        vmm,
    })
}

/// A start in progress: whose it is, to record its failure.
pub(super) struct Starting<'a> {
    pub(super) reg: &'a Registry,
    pub(super) name: &'a str,
    pub(super) me: Option<ProcessId>,
}

impl Starting<'_> {
    /// Records the start failed and returns `e`.
    pub(super) fn failed(&self, e: AgentError) -> AgentError {
        mark_failed(self.reg, self.name, self.me, &e.to_string());
        e
    }

    /// Records the start failed with `reason` (an internal error).
    pub(super) fn internal(&self, reason: String) -> AgentError {
        mark_failed(self.reg, self.name, self.me, &reason);
        AgentError::Internal(reason)
    }

    /// Records a boot failure with the console and VMM log tails.
    fn boot_failure(&self, reason: String, fallback: &Sandbox) -> AgentError {
        mark_failed(self.reg, self.name, self.me, &reason);
        let s = self
            .reg
            .get(self.name)
            .ok()
            .flatten()
            .unwrap_or_else(|| fallback.clone());
        AgentError::Boot {
            name: self.name.to_string(),
            reason,
            console: vmm_process::boot_logs(&s),
        }
    }
}

/// `start`, phase 2: the sandbox reserved for us (stopped first for
/// `--fresh`), and an earlier run's supervisor gone.
fn take(
    paths: &AgentPaths,
    plan: &Plan,
    progress: &mut dyn FnMut(&str),
) -> Result<Sandbox, AgentError> {
    let (sandbox, previous) = match reserve(paths, plan)? {
        Reservation::Reserved(s, previous) => (*s, previous),
        Reservation::Running(s) if plan.opts.fresh => {
            progress(&format!("stopping sandbox {} for --fresh", plan.name));
            stop_sandbox(&paths.registry(), &s);
            match reserve(paths, plan)? {
                Reservation::Reserved(s, previous) => (*s, previous),
                Reservation::Running(_) => {
                    return Err(AgentError::AlreadyRunning(plan.name.to_string()))
                }
            }
        }
        Reservation::Running(_) => return Err(AgentError::AlreadyRunning(plan.name.to_string())),
    };
    // A supervisor of an earlier run (its VMM gone) may still be cleaning
    // up: let it finish before the sockets are made again.
    if let Some(old) = previous.filter(|p| p.is_alive()) {
        if !old.wait_gone(STOP_GRACE + Duration::from_secs(2)) {
            old.signal(libc::SIGKILL);
            old.wait_gone(Duration::from_secs(2));
        }
    }
    Ok(sandbox)
}

/// `start`, phase 3: the private state directory, and a new disk when
/// there is none (or `--fresh`).
fn prepare_files(
    st: &Starting,
    sandbox: &Sandbox,
    project: &Path,
    fresh: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Option<DiskReport>, AgentError> {
    // The state directory holds the vsock sockets: only we may reach them.
    std::fs::create_dir_all(&sandbox.state_dir)
        .and_then(|()| {
            std::fs::set_permissions(&sandbox.state_dir, std::fs::Permissions::from_mode(0o700))
        })
        .map_err(|e| st.internal(format!("{}: {e}", sandbox.state_dir.display())))?;
    if !fresh && sandbox.disk.exists() {
        return Ok(None);
    }
    progress(&format!(
        "cloning {} into a new disk for sandbox {}",
        project.display(),
        sandbox.name
    ));
    let _ = std::fs::remove_file(&sandbox.disk);
    let _ = std::fs::remove_file(sandbox.host_keys());
    disk::create_disk(project, &sandbox.dir, &sandbox.disk)
        .map(Some)
        .map_err(|e| st.failed(AgentError::Disk(e)))
}

/// `start`, phase 4: the keystone-vmm launch recorded for the supervisor.
fn record_launch(
    st: &Starting,
    sandbox: &mut Sandbox,
    image: &Image,
    vmm: PathBuf,
    resume: Option<PathBuf>,
) -> Result<(), AgentError> {
    let key = if image.manifest.ssh {
        let key = session::authorized_key(sandbox)
            .map_err(|e| st.failed(AgentError::Image(format!("boot parameters: {e}"))))?;
        Some(key)
    } else {
        None
    };
    if let Err(why) = vmm_process::jail_available() {
        eprintln!("keystone: warning: the VMM runs without its jail (seccomp only): {why}");
    }
    let args = vmm_process::launch_args(sandbox, image, key.as_deref(), resume.as_deref())
        .map_err(|e| st.failed(e))?;
    let staging = super::snapshot::staging_dir(sandbox);
    std::fs::create_dir_all(&staging)
        .map_err(|e| st.failed(AgentError::Snapshot(format!("{}: {e}", staging.display()))))?;
    sandbox.launch = Some(Launch { vmm, args, resume });
    sandbox.image = Some(ImageRef {
        dir: image.dir.clone(),
        content_hash: image.manifest.content_hash.clone(),
        ssh: image.manifest.ssh,
    });
    let (launch, image_ref) = (sandbox.launch.clone(), sandbox.image.clone());
    st.reg
        .modify(st.name, |s| {
            s.launch = launch;
            s.image = image_ref;
        })
        .map_err(|e| st.internal(e.to_string()))?;
    Ok(())
}

/// `start`, phase 5: waits for the supervisor to report the guest ready
/// (or failed, or gone), up to `timeout` after `spawned`; returns the
/// sandbox as it runs.
pub(super) fn wait_ready(
    st: &Starting,
    child: &mut std::process::Child,
    sandbox: &Sandbox,
    spawned: Instant,
    timeout: Duration,
) -> Result<Sandbox, AgentError> {
    let (reg, name, me) = (st.reg, st.name, st.me);
    let deadline = spawned + timeout;
    loop {
        let Some(s) = reg.get(name)? else {
            return Err(AgentError::Internal(format!(
                "sandbox {name} was removed while starting"
            )));
        };
        if s.status == Status::Running && s.vmm.is_some_and(|p| p.is_alive()) {
            let _ = reg.modify(name, |r| {
                if r.starter == me {
                    r.starter = None;
                }
            });
            return Ok(reg.get(name)?.map(|r| r.observed()).unwrap_or(s));
        }
        if s.status == Status::Failed {
            let _ = child.wait();
            let reason = s
                .last_error
                .clone()
                .unwrap_or_else(|| "the supervisor failed".into());
            return Err(st.boot_failure(reason, sandbox));
        }
        if let Ok(Some(status)) = child.try_wait() {
            let s = reg.get(name)?.unwrap_or(s);
            let reason = s.last_error.clone().unwrap_or_else(|| {
                format!("the supervisor exited ({status}) before the guest was ready")
            });
            return Err(st.boot_failure(reason, sandbox));
        }
        if Instant::now() >= deadline {
            vmm_process::stop_supervisor_child(child);
            return Err(st.boot_failure(
                format!(
                    "the guest was not ready within {} s (KEYSTONE_READY_TIMEOUT)",
                    timeout.as_secs()
                ),
                sandbox,
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `start`: see the module docs and the issue. `progress` gets one-line
/// notes (for stderr).
pub fn start(
    paths: &AgentPaths,
    opts: &StartOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Started, AgentError> {
    let c = check_start(opts)?;
    let me = ProcessId::current();
    let plan = Plan {
        name: &c.name,
        project: &c.project,
        opts,
        network: c.network.clone(),
        me,
    };
    let mut sandbox = take(paths, &plan, progress)?;
    let reg = paths.registry();
    let st = Starting {
        reg: &reg,
        name: &c.name,
        me,
    };
    let new_disk = prepare_files(&st, &sandbox, &c.project, opts.fresh, progress)?;
    let snapshot = if opts.cold || new_disk.is_some() {
        None
    } else {
        let (snap, why) = snapshot::resumable(&sandbox, &c.image.manifest.content_hash);
        if let Some(why) = why {
            progress(&format!("{why}: booting"));
        }
        snap
    };
    let resumed = match &snapshot {
        Some(info) => Some(Resumed {
            tag: info.tag.clone(),
            kept_disk: snapshot::restore_disk(&sandbox, info).map_err(|e| st.failed(e))?,
        }),
        None => None,
    };
    let resume_dir = resumed.as_ref().map(|r| snapshot::dir_of(&sandbox, &r.tag));
    record_launch(&st, &mut sandbox, &c.image, c.vmm.clone(), resume_dir)?;

    progress(&match &resumed {
        Some(r) => format!("resuming sandbox {} from snapshot {}", c.name, r.tag),
        None => format!("booting sandbox {}", c.name),
    });
    let spawned = Instant::now();
    let mut child = vmm_process::spawn_supervisor(paths, &sandbox).map_err(|reason| {
        mark_failed(&reg, &c.name, me, &reason);
        AgentError::Boot {
            name: c.name.clone(),
            reason,
            console: String::new(),
        }
    })?;
    let sandbox = wait_ready(&st, &mut child, &sandbox, spawned, c.timeout)?;
    // One SSH handshake now, for every later exec/attach/sync to ride.
    if c.image.manifest.ssh && !session::open_master(&sandbox) {
        progress("no SSH master (each command will make its own connection)");
    }
    let boot_time = spawned.elapsed();
    // The clock and the RNG of a resumed guest are the snapshot's.
    let warning = match &resumed {
        Some(_) if c.image.manifest.ssh => session::after_restore(&sandbox, &Default::default())
            .err()
            .map(|e| e.to_string()),
        _ => None,
    };
    Ok(Started {
        sandbox,
        new_disk,
        boot_time,
        ssh: c.image.manifest.ssh,
        resumed,
        warning,
    })
}

/// Stops `s`: the guest's own poweroff first (SSH images, over the
/// session), then its processes ([`vmm_process::stop_processes`]).
pub(super) fn stop_sandbox(reg: &Registry, s: &Sandbox) {
    let vmm_alive = s.vmm.is_some_and(|p| p.is_alive());
    if s.image.as_ref().is_some_and(|i| i.ssh) && vmm_alive && session::request_poweroff(s) {
        if let Some(vmm) = s.vmm {
            vmm.wait_gone(STOP_GRACE);
        }
    }
    vmm_process::stop_processes(reg, s);
}

/// What `stop` did.
#[derive(Debug)]
pub struct Stopped {
    /// The sandbox.
    pub name: String,
    /// It was running (or starting).
    pub was_running: bool,
    /// `--sync` failed (the stop went on).
    pub sync_warning: Option<String>,
}

/// `stop [name] [--sync]`.
pub fn stop(paths: &AgentPaths, name: Option<&str>, sync: bool) -> Result<Stopped, AgentError> {
    let reg = paths.registry();
    let s = reg.find(name)?;
    let status = s.observed_status();
    let running = matches!(status, Status::Running | Status::Starting);
    if !running && !s.any_process_alive() {
        if sync {
            return Err(AgentError::NotRunning(s.name));
        }
        return Ok(Stopped {
            name: s.name,
            was_running: false,
            sync_warning: None,
        });
    }
    let sync_warning = if sync && status == Status::Running {
        session::sync_before_stop(&s).err().map(|e| e.to_string())
    } else {
        None
    };
    stop_sandbox(&reg, &s);
    Ok(Stopped {
        name: s.name,
        was_running: true,
        sync_warning,
    })
}

/// `destroy <name> [--force]`. Without `force`: refuses if the guest holds
/// unsynced commits ([`session::unsynced_commits`]), then asks `confirm`
/// (which returns `None` where it cannot ask, e.g. no terminal: refused).
pub fn destroy(
    paths: &AgentPaths,
    name: &str,
    force: bool,
    confirm: &mut dyn FnMut(&str) -> Option<bool>,
) -> Result<(), AgentError> {
    validate_name(name)?;
    let reg = paths.registry();
    let s = reg.find(Some(name))?;
    if !force {
        if let Some(n) = session::unsynced_commits(&s).filter(|&n| n > 0) {
            return Err(AgentError::Refused(format!(
                "sandbox {name} holds {n} commit{} not synced to the host: run `keystone agent sync {name}` first, or destroy --force",
                if n == 1 { "" } else { "s" }
            )));
        }
        match confirm(&format!("destroy sandbox {name} and its disk? [y/N] ")) {
            None => {
                return Err(AgentError::Refused(format!(
                    "not destroying sandbox {name} without confirmation (stdin is not a terminal): use --force"
                )))
            }
            Some(false) => return Err(AgentError::Refused("destroy cancelled".into())),
            Some(true) => {}
        }
    }
    if s.any_process_alive() {
        stop_sandbox(&reg, &s);
    }
    // Only ever remove the directory this sandbox name owns.
    let expected = paths.sandbox_dir(name);
    if s.dir != expected {
        return Err(AgentError::Internal(format!(
            "registry names {} as the directory of {name}, expected {}: not removing it",
            s.dir.display(),
            expected.display()
        )));
    }
    match std::fs::remove_dir_all(&expected) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(AgentError::Internal(format!(
                "removing {}: {e}",
                expected.display()
            )))
        }
    }
    s.remove_sockets();
    reg.update(|list| {
        list.retain(|r| r.name != name);
        Ok::<_, AgentError>(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three ways a macvtap is wrong, on a fake sysfs and /dev.
    #[test]
    fn macvtap_checks_say_which_part_is_missing() {
        let root = std::env::temp_dir().join(format!("ks-mvt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (sys, dev) = (root.join("sys"), root.join("dev"));
        std::fs::create_dir_all(sys.join("eth0")).unwrap();
        std::fs::create_dir_all(sys.join("mv0/macvtap")).unwrap();
        std::fs::write(sys.join("mv0/ifindex"), "7\n").unwrap();
        std::fs::create_dir_all(&dev).unwrap();
        let msg = |d: &str| check_macvtap(&sys, &dev, d).unwrap_err().to_string();
        assert!(
            msg("nope0").contains("no interface nope0"),
            "{}",
            msg("nope0")
        );
        assert!(
            msg("eth0").contains("eth0 is not a macvtap link"),
            "{}",
            msg("eth0")
        );
        assert!(
            msg("mv0").contains("cannot open") && msg("mv0").contains("tap7"),
            "{}",
            msg("mv0")
        );
        // A node that opens read-write passes (a regular file stands in).
        std::fs::write(dev.join("tap7"), "").unwrap();
        assert!(check_macvtap(&sys, &dev, "mv0").is_ok());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn networks_resolve() {
        assert_eq!(resolve_network(None, None).unwrap(), None);
        assert_eq!(
            resolve_network(Some(NetworkChoice::User), None).unwrap(),
            Some(Network::User)
        );
        assert_eq!(
            resolve_network(Some(NetworkChoice::Bridge), Some("ks0")).unwrap(),
            Some(Network::Bridge {
                device: "ks0".into()
            })
        );
        assert_eq!(
            resolve_network(None, Some("ks0")).unwrap(),
            Some(Network::Tap {
                device: "ks0".into()
            })
        );
        for (c, t) in [
            (Some(NetworkChoice::Tap), None),
            (Some(NetworkChoice::Bridge), None),
            (Some(NetworkChoice::Macvtap), None),
            (Some(NetworkChoice::Macvtap), Some("ksnolink0")),
            (Some(NetworkChoice::User), Some("ks0")),
            (Some(NetworkChoice::Tap), Some("a/b")),
            (Some(NetworkChoice::Tap), Some("waytoolonganame0")),
        ] {
            let e = resolve_network(c, t).unwrap_err();
            assert_eq!(e.exit_code(), super::super::exit::USAGE, "{c:?} {t:?}");
            assert!(!e.to_string().contains('\n'));
        }
    }
}
