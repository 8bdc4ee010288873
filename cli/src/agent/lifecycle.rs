//! The life-cycle verbs: `start`, `stop`, `status`, `list`, `destroy`.
//!
//! Each is a function from options to a report or an [`AgentError`]
//! (which carries the exit code); printing is left to [`super::cli`].
//!
//! `start` options are remembered: `--memory`, `--vcpus`, `--network`
//! (`--tap`) and `--sync-mode` given once apply to later starts of the same
//! sandbox until given again; `--no-nested` applies to the boot it is given
//! to.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::disk::{self, DiskError, DiskReport};
use super::hooks;
use super::state::{
    free_cid, now, remove_socket, sanitize_name, validate_name, vsock_socket_path, AgentPaths,
    ImageRef, Launch, Network, ProcessId, Registry, Sandbox, Status, SyncMode,
};
use super::AgentError;
use crate::doctor::HostReport;
use crate::image::{self, Image, NAME_PARAM, NOTIFY_PORT, READY_PORT};
use keystone_vmm::host::KvmFlavor;

/// Default guest memory, MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 8192;
/// Least guest memory `start` accepts, MiB.
pub const MIN_MEMORY_MIB: u64 = 2048;
/// Default vCPUs.
pub const DEFAULT_VCPUS: u8 = 4;
/// Default time to wait for the guest's readiness message.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long `stop` waits after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Lines of the console log shown when a start fails.
pub const CONSOLE_TAIL_LINES: usize = 20;

/// `--network` as given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkChoice {
    /// User-mode networking (passt).
    User,
    /// An existing tap device (`--tap NAME`).
    Tap,
    /// A macvtap device: not supported by keystone-vmm.
    Macvtap,
    /// An existing tap device on a bridge (`--tap NAME`).
    Bridge,
    /// No network.
    None,
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
            return Err(AgentError::Usage(
                "--network macvtap is not supported: keystone-vmm opens tap devices through /dev/net/tun; \
                 create a tap device on a bridge and use --network bridge --tap NAME"
                    .into(),
            ))
        }
        (Some(NetworkChoice::User), Some(_)) | (Some(NetworkChoice::None), Some(_)) => {
            return Err(AgentError::Usage(
                "--tap goes with --network tap or bridge".into(),
            ))
        }
        (Some(NetworkChoice::User), None) => Network::User,
        (Some(NetworkChoice::None), None) => Network::None,
    };
    Ok(Some(network))
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
    pub no_nested: bool,
    /// Make a new disk (stopping the sandbox first if it runs).
    pub fresh: bool,
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

/// The VMM binary: `$KEYSTONE_VMM`, else `keystone-vmm` next to this
/// program or on PATH.
pub fn resolve_vmm() -> Result<PathBuf, AgentError> {
    std::env::var_os("KEYSTONE_VMM")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| crate::bench::find_binary("keystone-vmm"))
        .ok_or_else(|| {
            AgentError::Image(
                "keystone-vmm not found next to keystone or on PATH (or set KEYSTONE_VMM)".into(),
            )
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
fn check_kvm(report: &HostReport) -> Result<(), AgentError> {
    match &report.kvm_usable {
        Ok(()) => Ok(()),
        Err(e) => Err(AgentError::NoKvm(format!(
            "KVM is not available ({e}): see `keystone doctor`"
        ))),
    }
}

/// KVM able to run this image (else exit 4).
fn check_flavor(report: &HostReport, image: &Image) -> Result<(), AgentError> {
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

/// The sandbox `name`, or (no name) the one whose project is the current
/// directory's git top level.
pub fn find(reg: &Registry, name: Option<&str>) -> Result<Sandbox, AgentError> {
    let list = reg.load()?;
    if let Some(name) = name {
        validate_name(name)?;
        return list
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| AgentError::NotFound(name.to_string()));
    }
    let here = cwd()?;
    let project = disk::git_toplevel(&here).map_err(|_| {
        AgentError::NoProjectSandbox(format!(
            "{} is not inside a git repository: name the sandbox",
            here.display()
        ))
    })?;
    let mut mine: Vec<Sandbox> = list
        .into_iter()
        .filter(|s| s.project_path == project)
        .collect();
    match mine.len() {
        0 => Err(AgentError::NoProjectSandbox(format!(
            "no sandbox for {}: name one (`keystone agent list`)",
            project.display()
        ))),
        1 => Ok(mine.remove(0)),
        _ => {
            let names: Vec<&str> = mine.iter().map(|s| s.name.as_str()).collect();
            Err(AgentError::NoProjectSandbox(format!(
                "several sandboxes for {}: {}; name one",
                project.display(),
                names.join(", ")
            )))
        }
    }
}

/// The sandbox as it is now: the observed status, and the pids of
/// processes that are gone cleared.
pub fn observed(s: &Sandbox) -> Sandbox {
    let mut v = s.clone();
    v.status = s.observed_status();
    let keep = |p: Option<ProcessId>| p.filter(ProcessId::is_alive);
    v.vmm = keep(v.vmm);
    v.supervisor = keep(v.supervisor);
    v.starter = keep(v.starter);
    v
}

/// `status`: one sandbox as it is now.
pub fn status(paths: &AgentPaths, name: Option<&str>) -> Result<Sandbox, AgentError> {
    Ok(observed(&find(&paths.registry(), name)?))
}

/// `list`: every sandbox as it is now, by name.
pub fn list(paths: &AgentPaths) -> Result<Vec<Sandbox>, AgentError> {
    Ok(paths.registry().load()?.iter().map(observed).collect())
}

/// Strips what a terminal would interpret from guest output (escape
/// sequences, other control characters), keeping tabs.
pub fn sanitize_for_terminal(text: &str) -> String {
    text.chars()
        .map(|c| if c == '\t' || !c.is_control() { c } else { '?' })
        .collect()
}

/// The last `lines` lines of `path` (at most its last 64 KiB), sanitized.
pub fn tail(path: &Path, lines: usize) -> Vec<String> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.take(64 * 1024).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| sanitize_for_terminal(l))
        .collect()
}

/// The console and VMM log tails shown when a start fails.
pub fn boot_logs(s: &Sandbox) -> String {
    let mut out = String::new();
    for (what, path, n) in [
        ("console", s.console_log(), CONSOLE_TAIL_LINES),
        ("keystone-vmm log", s.vmm_log(), 10),
    ] {
        let lines = tail(&path, n);
        out.push_str(&format!(
            "--- {what} ({}), last lines ---\n",
            path.display()
        ));
        if lines.is_empty() {
            out.push_str("(empty)\n");
        }
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
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
                let state_dir = dir.join("state");
                list.push(Sandbox {
                    name: plan.name.to_string(),
                    project_path: plan.project.to_path_buf(),
                    disk: dir.join("disk.ext4"),
                    vsock_uds: vsock_socket_path(&state_dir, plan.name)?,
                    state_dir,
                    dir,
                    cid,
                    memory_mib: DEFAULT_MEMORY_MIB,
                    vcpus: DEFAULT_VCPUS,
                    nested: true,
                    network: Network::User,
                    sync_mode: SyncMode::Manual,
                    status: Status::Stopped,
                    starter: None,
                    supervisor: None,
                    vmm: None,
                    created_at: now(),
                    started_at: None,
                    ready_at: None,
                    stopped_at: None,
                    image: None,
                    launch: None,
                    last_error: None,
                });
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
        s.nested = !o.no_nested;
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

/// The keystone-vmm arguments for `s` booting `image`.
fn vmm_args(
    s: &Sandbox,
    image: &Image,
    extra_cmdline: &[String],
) -> Result<Vec<String>, AgentError> {
    let path = |p: &Path, what: &str| -> Result<String, AgentError> {
        let text = p.to_str().ok_or_else(|| {
            AgentError::Image(format!("{what} path {} is not UTF-8", p.display()))
        })?;
        if text.contains(',') {
            return Err(AgentError::Image(format!(
                "{what} path {text} contains ',', which keystone-vmm's --disk cannot take"
            )));
        }
        Ok(text.to_string())
    };
    let mut cmdline = image.manifest.cmdline.trim().to_string();
    for token in
        std::iter::once(format!("{NAME_PARAM}={}", s.name)).chain(extra_cmdline.iter().cloned())
    {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(&token);
    }
    let mut args = vec!["--kernel".to_string(), path(&image.kernel(), "kernel")?];
    if let Some(initrd) = image.initrd() {
        args.push("--initrd".into());
        args.push(path(&initrd, "initrd")?);
    }
    args.extend([
        "--cmdline".into(),
        cmdline,
        "--memory".into(),
        s.memory_mib.to_string(),
        "--vcpus".into(),
        s.vcpus.to_string(),
    ]);
    if !s.nested {
        args.push("--no-nested".into());
    }
    if let Some(rootfs) = image.rootfs() {
        args.push("--disk".into());
        args.push(format!("{},ro", path(&rootfs, "rootfs")?));
    }
    args.push("--disk".into());
    args.push(path(&s.disk, "disk")?);
    args.push("--vsock".into());
    args.push(format!("{},{}", s.cid, s.vsock_uds.display()));
    if let Some(net) = s.network.vmm_arg(&s.name) {
        args.push("--net".into());
        args.push(net);
    }
    args.push("--boot-timer".into());
    Ok(args)
}

/// Spawns the supervisor of `name`, detached (new session, stdio to
/// `state/supervisor.log`, working directory `/`).
fn spawn_supervisor(paths: &AgentPaths, s: &Sandbox) -> Result<std::process::Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating keystone: {e}"))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(s.supervisor_log())
        .map_err(|e| format!("{}: {e}", s.supervisor_log().display()))?;
    let log2 = log
        .try_clone()
        .map_err(|e| format!("{}: {e}", s.supervisor_log().display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("agent")
        .arg("__supervise")
        .arg("--root")
        .arg(&paths.root)
        .arg(&s.name)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .current_dir("/");
    // SAFETY: setsid(2) is async-signal-safe; it only fails if we already
    // lead a process group, which a fresh child does not.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| format!("starting the supervisor: {e}"))
}

/// `start`: see the module docs and the issue. `progress` gets one-line
/// notes (for stderr).
pub fn start(
    paths: &AgentPaths,
    opts: &StartOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Started, AgentError> {
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
    let vmm = resolve_vmm()?;

    let me = ProcessId::current();
    let plan = Plan {
        name: &name,
        project: &project,
        opts,
        network,
        me,
    };
    let reg = paths.registry();
    let (mut sandbox, previous) = match reserve(paths, &plan)? {
        Reservation::Reserved(s, previous) => (*s, previous),
        Reservation::Running(s) if opts.fresh => {
            progress(&format!("stopping sandbox {name} for --fresh"));
            stop_processes(&reg, &s);
            match reserve(paths, &plan)? {
                Reservation::Reserved(s, previous) => (*s, previous),
                Reservation::Running(_) => return Err(AgentError::AlreadyRunning(name)),
            }
        }
        Reservation::Running(_) => return Err(AgentError::AlreadyRunning(name)),
    };
    let fail = |reason: String| -> AgentError {
        mark_failed(&reg, &name, me, &reason);
        AgentError::Internal(reason)
    };

    // A supervisor of an earlier run (its VMM gone) may still be cleaning
    // up: let it finish before the sockets are made again.
    if let Some(old) = previous.filter(|p| p.is_alive()) {
        if !old.wait_gone(STOP_GRACE + Duration::from_secs(2)) {
            old.signal(libc::SIGKILL);
            old.wait_gone(Duration::from_secs(2));
        }
    }
    // The state directory holds the vsock sockets: only we may reach them.
    std::fs::create_dir_all(&sandbox.state_dir)
        .and_then(|()| {
            std::fs::set_permissions(&sandbox.state_dir, std::fs::Permissions::from_mode(0o700))
        })
        .map_err(|e| fail(format!("{}: {e}", sandbox.state_dir.display())))?;

    let new_disk = if opts.fresh || !sandbox.disk.exists() {
        progress(&format!(
            "cloning {} into a new disk for sandbox {name}",
            project.display()
        ));
        let _ = std::fs::remove_file(&sandbox.disk);
        let _ = std::fs::remove_file(sandbox.host_keys());
        match disk::create_disk(&project, &sandbox.dir, &sandbox.disk) {
            Ok(r) => Some(r),
            Err(e) => {
                mark_failed(&reg, &name, me, &e.to_string());
                return Err(AgentError::Disk(e));
            }
        }
    } else {
        None
    };

    let extra = if image.manifest.ssh {
        hooks::boot_params(&sandbox).map_err(|e| {
            let reason = format!("boot parameters: {e}");
            mark_failed(&reg, &name, me, &reason);
            AgentError::Image(reason)
        })?
    } else {
        Vec::new()
    };
    let args = match vmm_args(&sandbox, &image, &extra) {
        Ok(a) => a,
        Err(e) => {
            mark_failed(&reg, &name, me, &e.to_string());
            return Err(e);
        }
    };
    sandbox.launch = Some(Launch { vmm, args });
    sandbox.image = Some(ImageRef {
        dir: image.dir.clone(),
        content_hash: image.manifest.content_hash.clone(),
        ssh: image.manifest.ssh,
    });
    let (launch, image_ref) = (sandbox.launch.clone(), sandbox.image.clone());
    reg.modify(&name, |s| {
        s.launch = launch;
        s.image = image_ref;
    })
    .map_err(|e| fail(e.to_string()))?;

    progress(&format!("booting sandbox {name}"));
    let spawned = Instant::now();
    let mut child = spawn_supervisor(paths, &sandbox).map_err(|reason| {
        mark_failed(&reg, &name, me, &reason);
        AgentError::Boot {
            name: name.clone(),
            reason,
            console: String::new(),
        }
    })?;
    let boot_failure = |reg: &Registry, reason: String| -> AgentError {
        mark_failed(reg, &name, me, &reason);
        let s = reg
            .get(&name)
            .ok()
            .flatten()
            .unwrap_or_else(|| sandbox.clone());
        AgentError::Boot {
            name: name.clone(),
            reason,
            console: boot_logs(&s),
        }
    };
    let deadline = spawned + timeout;
    loop {
        let current = reg.get(&name)?;
        let Some(s) = current else {
            return Err(AgentError::Internal(format!(
                "sandbox {name} was removed while starting"
            )));
        };
        if s.status == Status::Running && s.vmm.is_some_and(|p| p.is_alive()) {
            let boot_time = spawned.elapsed();
            let _ = reg.modify(&name, |r| {
                if r.starter == me {
                    r.starter = None;
                }
            });
            let sandbox = reg.get(&name)?.map(|r| observed(&r)).unwrap_or(s);
            return Ok(Started {
                sandbox,
                new_disk,
                boot_time,
                ssh: image.manifest.ssh,
            });
        }
        if s.status == Status::Failed {
            let _ = child.wait();
            let reason = s
                .last_error
                .clone()
                .unwrap_or_else(|| "the supervisor failed".into());
            return Err(boot_failure(&reg, reason));
        }
        if let Ok(Some(st)) = child.try_wait() {
            let s = reg.get(&name)?.unwrap_or(s);
            let reason = s.last_error.clone().unwrap_or_else(|| {
                format!("the supervisor exited ({st}) before the guest was ready")
            });
            return Err(boot_failure(&reg, reason));
        }
        if Instant::now() >= deadline {
            stop_supervisor_child(&mut child);
            return Err(boot_failure(
                &reg,
                format!(
                    "the guest was not ready within {} s (KEYSTONE_READY_TIMEOUT)",
                    timeout.as_secs()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM to our supervisor child (it stops the VMM), SIGKILL if it
/// lingers; reaps it.
fn stop_supervisor_child(child: &mut std::process::Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on our own child, not reaped yet, so the pid is its.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + STOP_GRACE + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Stops `s`'s processes: the guest's own poweroff first (SSH images), then
/// SIGTERM to the supervisor (which stops the VMM) or to the VMM itself,
/// SIGKILL after [`STOP_GRACE`]; then records it stopped (unless another
/// run took over) and removes its sockets.
fn stop_processes(reg: &Registry, s: &Sandbox) {
    let alive = |p: &Option<ProcessId>| p.is_some_and(|p| p.is_alive());
    if s.image.as_ref().is_some_and(|i| i.ssh) && alive(&s.vmm) && hooks::request_poweroff(s) {
        if let Some(vmm) = s.vmm {
            vmm.wait_gone(STOP_GRACE);
        }
    }
    let procs: Vec<ProcessId> = [s.vmm, s.supervisor, s.starter]
        .into_iter()
        .flatten()
        .collect();
    if let Some(sup) = s.supervisor.filter(|p| p.is_alive()) {
        sup.signal(libc::SIGTERM);
    } else if let Some(vmm) = s.vmm.filter(|p| p.is_alive()) {
        vmm.signal(libc::SIGTERM);
    }
    if let Some(starter) = s.starter.filter(|p| p.is_alive()) {
        if Some(starter) != ProcessId::current() {
            starter.signal(libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    let me = ProcessId::current();
    let others = || {
        procs
            .iter()
            .filter(|p| Some(**p) != me && p.is_alive())
            .count()
    };
    while others() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in procs.iter().filter(|p| Some(**p) != me) {
        if p.is_alive() {
            p.signal(libc::SIGKILL);
            p.wait_gone(Duration::from_secs(2));
        }
    }
    let mut clean = false;
    let _ = reg.modify(&s.name, |r| {
        let taken_over = r
            .supervisor
            .is_some_and(|p| p.is_alive() && Some(p) != s.supervisor);
        if !taken_over {
            if r.status != Status::Failed {
                r.status = Status::Stopped;
            }
            r.vmm = None;
            r.supervisor = None;
            if r.starter != me {
                r.starter = None;
            }
            r.stopped_at = Some(now());
            clean = true;
        }
    });
    if clean {
        remove_socket(&s.vsock_uds);
        remove_socket(&s.port_socket(READY_PORT));
        remove_socket(&s.port_socket(NOTIFY_PORT));
    }
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
    let s = find(&reg, name)?;
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
        hooks::sync_before_stop(&s).err().map(|e| e.to_string())
    } else {
        None
    };
    stop_processes(&reg, &s);
    Ok(Stopped {
        name: s.name,
        was_running: true,
        sync_warning,
    })
}

/// `destroy <name> [--force]`. Without `force`: refuses if the guest holds
/// unsynced commits ([`hooks::unsynced_commits`]), then asks `confirm`
/// (which returns `None` where it cannot ask, e.g. no terminal: refused).
pub fn destroy(
    paths: &AgentPaths,
    name: &str,
    force: bool,
    confirm: &mut dyn FnMut(&str) -> Option<bool>,
) -> Result<(), AgentError> {
    validate_name(name)?;
    let reg = paths.registry();
    let s = find(&reg, Some(name))?;
    if !force {
        if let Some(n) = hooks::unsynced_commits(&s).filter(|&n| n > 0) {
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
        stop_processes(&reg, &s);
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
    remove_socket(&s.vsock_uds);
    remove_socket(&s.port_socket(READY_PORT));
    remove_socket(&s.port_socket(NOTIFY_PORT));
    reg.update(|list| {
        list.retain(|r| r.name != name);
        Ok::<_, AgentError>(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
            (Some(NetworkChoice::Macvtap), Some("mv0")),
            (Some(NetworkChoice::User), Some("ks0")),
            (Some(NetworkChoice::Tap), Some("a/b")),
            (Some(NetworkChoice::Tap), Some("waytoolonganame0")),
        ] {
            let e = resolve_network(c, t).unwrap_err();
            assert_eq!(e.exit_code(), super::super::exit::USAGE, "{c:?} {t:?}");
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn terminal_output_is_sanitized() {
        assert_eq!(
            sanitize_for_terminal("ok\x1b[31mred\x07\tx"),
            "ok?[31mred?\tx"
        );
    }
}
