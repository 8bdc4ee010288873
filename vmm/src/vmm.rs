//! Running a built VM: the vCPU threads, the event loop (event-manager) on
//! the VMM thread, and an orderly stop.

use std::io::{BufRead, IsTerminal};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use keystone_devices::boot_timer::{BootTime, Timestamp};
use keystone_devices::bus::lock;
use keystone_devices::serial::SerialDevice;
use seccompiler::BpfProgram;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;
use vmm_sys_util::terminal::Terminal;

use crate::api::{ApiServer, Request};
use crate::builder::{build, BuildError, BuiltVm};
use crate::config::{SerialConfig, VmConfig};
use crate::seccomp::{self, ThreadKind, Violation};
use crate::signals;
use crate::snapshot::{SnapshotDir, VmState, SNAPSHOT_VERSION};
use crate::vcpu::{VcpuControl, VcpuResult, VcpuStop};

/// Errors running the VMM (not guest failures: those are a [`VmExit`]).
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Building the VM failed.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// eventfd creation failed.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventManager(String),
    /// The jail could not be set up.
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    /// A seccomp filter could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// A vCPU thread could not be started.
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
    /// The API socket or the snapshot directory could not be opened.
    #[error("{what} {path}: {source}")]
    Api {
        /// Which option.
        what: &'static str,
        /// The path.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// How the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset or powered off (i8042, or a KVM system event).
    GuestReset,
    /// The guest powered off through ACPI (S5 on the sleep control
    /// register).
    GuestPowerOff,
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// A vCPU halted with nothing to wake it.
    GuestHalted,
    /// A vCPU failed: triple fault, internal error, failed entry.
    GuestError(String),
}

impl VmExit {
    /// Process exit code: 0 for an orderly end, 1 for a guest failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::GuestReset
            | VmExit::GuestPowerOff
            | VmExit::Signal(_)
            | VmExit::GuestHalted => 0,
            VmExit::GuestError(_) => 1,
        }
    }
}

/// Watches the ways a VM ends: guest reset or ACPI poweroff, a vCPU thread
/// ending, and SIGTERM/SIGINT.
struct ExitWatcher {
    reset_evt: EventFd,
    poweroff_evt: EventFd,
    vcpu_evt: EventFd,
    signal_evt: EventFd,
    vcpu_results: Receiver<VcpuResult>,
    exit: Option<VmExit>,
}

impl ExitWatcher {
    fn set(&mut self, exit: VmExit) {
        // A failure outranks an orderly end seen at the same time.
        match (&self.exit, &exit) {
            (Some(VmExit::GuestError(_)), _) => {}
            _ => self.exit = Some(exit),
        }
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == std::os::fd::AsRawFd::as_raw_fd(&self.reset_evt) {
            let _ = self.reset_evt.read();
            self.set(VmExit::GuestReset);
        } else if fd == std::os::fd::AsRawFd::as_raw_fd(&self.poweroff_evt) {
            let _ = self.poweroff_evt.read();
            self.set(VmExit::GuestPowerOff);
        } else if fd == std::os::fd::AsRawFd::as_raw_fd(&self.signal_evt) {
            let _ = self.signal_evt.read();
            self.set(VmExit::Signal(
                signals::exit_signal().unwrap_or(libc::SIGTERM),
            ));
        } else if fd == std::os::fd::AsRawFd::as_raw_fd(&self.vcpu_evt) {
            let _ = self.vcpu_evt.read();
            while let Ok((id, res)) = self.vcpu_results.try_recv() {
                match res {
                    Ok(VcpuStop::Requested) => {}
                    Ok(VcpuStop::GuestReset) => self.set(VmExit::GuestReset),
                    Ok(VcpuStop::Halted) => {
                        tracing::info!("vCPU {id} halted");
                        self.set(VmExit::GuestHalted)
                    }
                    Err(e) => self.set(VmExit::GuestError(e.to_string())),
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for evt in [
            &self.reset_evt,
            &self.poweroff_evt,
            &self.vcpu_evt,
            &self.signal_evt,
        ] {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                tracing::error!("cannot watch an exit event: {e:?}");
            }
        }
    }
}

/// Feeds the VMM's stdin to the guest's UART.
struct StdinInput {
    serial: Arc<Mutex<SerialDevice>>,
}

impl MutEventSubscriber for StdinInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        let mut lock_in = stdin.lock();
        // One read(2) at most; everything it returned is consumed, so
        // nothing lingers in std's buffer unseen by epoll.
        let n = match lock_in.fill_buf() {
            Ok(buf) => {
                let n = buf.len();
                if n > 0 {
                    lock(&self.serial).enqueue_input(buf);
                }
                n
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return,
            Err(_) => 0,
        };
        lock_in.consume(n);
        if n == 0 {
            // EOF or error: stop watching stdin.
            let _ = ops.remove(events);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        if let Err(e) = ops.add(Events::new(&stdin, EventSet::IN)) {
            // A regular file or /dev/null cannot be polled: no console input.
            tracing::debug!("not reading stdin (cannot poll it): {e:?}");
        }
    }
}

/// Puts a terminal stdin in raw mode, and back on drop.
struct RawStdin;

impl RawStdin {
    fn enable() -> Option<Self> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        stdin.lock().set_raw_mode().ok().map(|_| RawStdin)
    }
}

impl Drop for RawStdin {
    fn drop(&mut self) {
        let _ = std::io::stdin().lock().set_canon_mode();
    }
}

/// The VMM's event loop: the exit watcher first, then the devices, then
/// the console input.
type Loop = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// Build and run the VM until it ends. `start` is when the VMM process
/// started; `boot_time_tx` receives boot-timer measurements.
///
/// The phases, in order: build the VM; set up the event loop; confine the
/// process (jail, then the seccomp programs); start the vCPU threads, held
/// at a gate; filter the VMM thread and open the gate; run the loop until
/// the VM ends; stop the vCPUs and report memory use.
pub fn run(
    config: &VmConfig,
    start: Timestamp,
    boot_time_tx: Option<Sender<BootTime>>,
) -> Result<VmExit, VmmError> {
    let signal_evt = signals::install().map_err(VmmError::Signals)?;
    let mut built = build(config, start, boot_time_tx)?;

    let vcpu_evt = EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    let (done_tx, done_rx) = channel();
    let watcher = Arc::new(Mutex::new(ExitWatcher {
        reset_evt: built
            .devices
            .reset_evt
            .try_clone()
            .map_err(VmmError::EventFd)?,
        poweroff_evt: built
            .devices
            .poweroff_evt
            .try_clone()
            .map_err(VmmError::EventFd)?,
        vcpu_evt: vcpu_evt.try_clone().map_err(VmmError::EventFd)?,
        signal_evt,
        vcpu_results: done_rx,
        exit: None,
    }));
    let (mut em, _raw) = event_loop(config, &mut built, watcher.clone())?;
    let api = match &config.api_sock {
        Some(path) => {
            let server = ApiServer::bind(path).map_err(|source| VmmError::Api {
                what: "--api-sock",
                path: path.clone(),
                source,
            })?;
            let server = Arc::new(Mutex::new(server));
            em.add_subscriber(server.clone());
            Some(server)
        }
        None => None,
    };
    let snapshot_dir = match &config.snapshot_dir {
        Some(path) => Some(SnapshotDir::open(path).map_err(|source| VmmError::Api {
            what: "--snapshot-dir",
            path: path.clone(),
            source,
        })?),
        None => None,
    };

    // Everything the VMM thread needs from the filesystem is open now: the
    // filters below have no open/openat.
    let mut proc_files = crate::metrics::ProcFiles::open();
    let (vmm_filter, vcpu_filter) = confine(config, snapshot_dir.as_ref())?;

    let stop = Arc::new(AtomicBool::new(false));
    // vCPU threads filter themselves, then wait here until the VMM thread
    // has filtered itself too: no guest instruction runs before that.
    let start_gate = Arc::new(Barrier::new(built.vcpus.len() + 1));
    let control = Arc::new(VcpuControl::default());
    let handles = spawn_vcpus(
        &mut built,
        vcpu_filter,
        &start_gate,
        &stop,
        &control,
        &done_tx,
        &vcpu_evt,
    )?;
    let filtered = match &vmm_filter {
        Some(prog) => seccomp::install(prog),
        None => Ok(()),
    };
    // The moment the vCPUs are released: taken before the gate opens, so
    // it always precedes anything the guest does.
    let released = Timestamp::now();
    start_gate.wait();
    if let Err(e) = filtered {
        stop_vcpus(&stop, &control, handles);
        return Err(e.into());
    }
    tracing::debug!(
        "boot phase vcpus started: {} us",
        released.wall_us.saturating_sub(start.wall_us)
    );

    let mut ctl = Controller {
        api,
        snapshot_dir,
        control: &control,
        handles: &handles,
        built: &built,
        memory_mib: config.memory_mib,
        paused: false,
    };
    let exit = run_until_exit(&mut em, &watcher, &mut ctl);
    drop(ctl);
    let exit = match exit {
        Ok(exit) => exit,
        Err(e) => {
            stop_vcpus(&stop, &control, handles);
            return Err(e);
        }
    };
    if !stop_vcpus(&stop, &control, handles) {
        // A vCPU thread still in KVM_RUN keeps the VM alive: its memory
        // mappings must outlive it, so they are leaked, not unmapped.
        std::mem::forget(built.mem.clone());
    }
    log_memory(proc_files.as_mut(), &built);
    Ok(exit)
}

/// Phase: the event loop, with the exit watcher, every device, and (serial
/// on stdio) the console input, stdin in raw mode while it lasts.
fn event_loop(
    config: &VmConfig,
    built: &mut BuiltVm,
    watcher: Arc<Mutex<ExitWatcher>>,
) -> Result<(Loop, Option<RawStdin>), VmmError> {
    let mut em = Loop::new().map_err(|e| VmmError::EventManager(format!("{e:?}")))?;
    em.add_subscriber(watcher);
    for device in built.devices.subscribers.drain(..) {
        em.add_subscriber(device);
    }
    let raw = if config.serial == SerialConfig::Stdio {
        em.add_subscriber(Arc::new(Mutex::new(StdinInput {
            serial: built.devices.serial.clone(),
        })));
        RawStdin::enable()
    } else {
        None
    };
    Ok((em, raw))
}

/// Phase: the jail (if configured), then the seccomp programs for the VMM
/// thread and the vCPU threads (installed later, by each thread).
fn confine(
    config: &VmConfig,
    snapshot_dir: Option<&SnapshotDir>,
) -> Result<(Option<BpfProgram>, Option<Arc<BpfProgram>>), VmmError> {
    if let Some(jail) = &config.jail {
        let keep = config
            .vsock
            .as_ref()
            .and_then(|v| v.uds_path.parent().map(|p| p.to_path_buf()));
        crate::jail::confine(jail, keep.as_deref())?;
        tracing::info!(
            "jailed: uid {}, gid {}, root {}",
            jail.uid,
            jail.gid,
            jail.root.display()
        );
    }
    if !config.seccomp {
        tracing::warn!("seccomp filters are off (--no-seccomp): for debugging only");
        return Ok((None, None));
    }
    let violation = if config.seccomp_log {
        seccomp::install_log_handler()?;
        tracing::warn!("seccomp violations are logged (--seccomp-log): for debugging only");
        Violation::Log
    } else {
        Violation::Kill
    };
    let vmm_kind = match snapshot_dir {
        Some(d) => ThreadKind::VmmSnapshots(d.raw_fd()),
        None => ThreadKind::Vmm,
    };
    Ok((
        Some(seccomp::program(vmm_kind, violation)?),
        Some(Arc::new(seccomp::program(ThreadKind::Vcpu, violation)?)),
    ))
}

/// Phase: one thread per vCPU, each filtering itself and then waiting at
/// `start_gate`.
fn spawn_vcpus(
    built: &mut BuiltVm,
    vcpu_filter: Option<Arc<BpfProgram>>,
    start_gate: &Arc<Barrier>,
    stop: &Arc<AtomicBool>,
    control: &Arc<VcpuControl>,
    done_tx: &Sender<VcpuResult>,
    vcpu_evt: &EventFd,
) -> Result<Vec<std::thread::JoinHandle<()>>, VmmError> {
    let mut handles = Vec::new();
    let msr_list = Arc::new(built.vm.msr_list.clone());
    for vcpu in built.vcpus.drain(..) {
        let evt = vcpu_evt.try_clone().map_err(VmmError::EventFd)?;
        match vcpu.spawn(
            vcpu_filter.clone(),
            start_gate.clone(),
            stop.clone(),
            control.clone(),
            msr_list.clone(),
            done_tx.clone(),
            evt,
        ) {
            Ok(h) => handles.push(h),
            Err(e) => {
                // The threads already spawned wait at the gate, which is
                // sized for all of them and is never opened: no guest code
                // runs, and the process exits with this error.
                stop.store(true, Ordering::Release);
                return Err(VmmError::Thread(e));
            }
        }
    }
    Ok(handles)
}

/// Phase: the event loop, until the exit watcher has an exit; API
/// requests are carried out between its rounds.
fn run_until_exit(
    em: &mut Loop,
    watcher: &Mutex<ExitWatcher>,
    ctl: &mut Controller<'_>,
) -> Result<VmExit, VmmError> {
    loop {
        match em.run() {
            Ok(_) => {}
            Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(VmmError::EventManager(format!("{e:?}"))),
        }
        if let Some(exit) = lock(watcher).exit.take() {
            return Ok(exit);
        }
        ctl.serve();
    }
}

/// What the API acts on: the vCPU threads, the built VM, the snapshot
/// directory.
struct Controller<'a> {
    api: Option<Arc<Mutex<ApiServer>>>,
    snapshot_dir: Option<SnapshotDir>,
    control: &'a VcpuControl,
    handles: &'a [std::thread::JoinHandle<()>],
    built: &'a BuiltVm,
    memory_mib: u64,
    paused: bool,
}

impl Controller<'_> {
    fn serve(&mut self) {
        let Some(api) = self.api.clone() else {
            return;
        };
        let requests = lock(&api).take_requests();
        for (client, req) in requests {
            let reply = match req.and_then(|r| self.handle(r)) {
                Ok(mut v) => {
                    v["ok"] = true.into();
                    v
                }
                Err(e) => serde_json::json!({ "ok": false, "error": e }),
            };
            lock(&api).reply(client, &reply);
        }
    }

    fn state_name(&self) -> &'static str {
        if self.paused {
            "paused"
        } else {
            "running"
        }
    }

    fn handle(&mut self, req: Request) -> Result<serde_json::Value, String> {
        match req {
            Request::State => Ok(serde_json::json!({
                "state": self.state_name(),
                "vcpus": self.handles.len(),
                "memory_mib": self.memory_mib,
                "version": env!("CARGO_PKG_VERSION"),
            })),
            Request::Pause => {
                let t = Instant::now();
                self.pause()?;
                Ok(serde_json::json!({ "state": "paused", "ms": ms(t) }))
            }
            Request::Resume => {
                self.resume();
                Ok(serde_json::json!({ "state": "running" }))
            }
            Request::Snapshot => {
                let t = Instant::now();
                let was_paused = self.paused;
                self.pause()?;
                let res = self.snapshot();
                if !was_paused {
                    self.resume();
                }
                let (dir, stored) = res?;
                Ok(serde_json::json!({
                    "state": self.state_name(),
                    "dir": dir,
                    "memory_bytes": stored,
                    "ms": ms(t),
                }))
            }
        }
    }

    /// Kick every vCPU out of KVM_RUN until each has saved its state and
    /// parked (bounded: 2 s).
    fn pause(&mut self) -> Result<(), String> {
        if self.paused {
            return Ok(());
        }
        self.control.request_pause();
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.control.paused_count() < self.handles.len() {
            if Instant::now() > deadline || self.handles.iter().any(|h| h.is_finished()) {
                self.control.release();
                return Err("the vCPUs did not pause within 2 s".into());
            }
            for h in self.handles {
                let _ = h.kill(signals::vcpu_kick_signal());
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        self.paused = true;
        tracing::info!("VM paused");
        Ok(())
    }

    fn resume(&mut self) {
        if self.paused {
            self.control.release();
            self.paused = false;
            tracing::info!("VM resumed");
        }
    }

    fn snapshot(&self) -> Result<(String, u64), String> {
        let Some(dir) = &self.snapshot_dir else {
            return Err("no --snapshot-dir was given".into());
        };
        let vcpus = self.control.saved()?;
        let state = VmState {
            version: SNAPSHOT_VERSION,
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            memory_mib: self.memory_mib,
            vcpus,
            vm: self.built.vm.save_state().map_err(|e| e.to_string())?,
            devices: self.built.devices.save_state(),
        };
        let stored = dir
            .write(&state, &self.built.mem)
            .map_err(|e| e.to_string())?;
        tracing::info!(
            "snapshot written to {} ({} KiB of memory stored)",
            dir.path().display(),
            stored >> 10
        );
        Ok((dir.path().display().to_string(), stored))
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// Phase: the memory report (peak RSS, guest RAM touched, VMM overhead).
fn log_memory(proc_files: Option<&mut crate::metrics::ProcFiles>, built: &BuiltVm) {
    if let Some(m) = proc_files.and_then(|f| crate::metrics::memory_usage(f, &built.mem)) {
        tracing::info!(
            "VMM memory: peak RSS {} KiB, guest RAM touched {} KiB, VMM overhead {} KiB",
            m.peak_rss_kib,
            m.guest_rss_kib,
            m.overhead_kib()
        );
    }
}

/// Ask every vCPU thread to stop and wait (bounded) for them. Returns
/// whether all of them stopped.
fn stop_vcpus(
    stop: &AtomicBool,
    control: &VcpuControl,
    handles: Vec<std::thread::JoinHandle<()>>,
) -> bool {
    let mut all = true;
    stop.store(true, Ordering::Release);
    // Paused ones wake, see `stop` and end.
    control.release();
    let deadline = Instant::now() + Duration::from_secs(2);
    for h in handles {
        // Kick until it leaves KVM_RUN: a kick that lands just before it
        // enters KVM_RUN is lost, the next one is not.
        while !h.is_finished() && Instant::now() < deadline {
            let _ = h.kill(signals::vcpu_kick_signal());
            std::thread::sleep(Duration::from_micros(200));
        }
        if h.is_finished() {
            let _ = h.join();
        } else {
            all = false;
            tracing::warn!("a vCPU thread did not stop in time; exiting anyway");
        }
    }
    all
}
