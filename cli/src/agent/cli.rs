//! `keystone agent ...`: argument parsing (clap) and printing for the
//! life-cycle verbs. `main.rs` only forwards [`AgentCommand`] to [`run`].

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

use super::lifecycle::{self, NetworkChoice, StartOptions};
use super::state::{format_time, AgentPaths, Sandbox, SyncMode};
use super::{exit, net, ports, remote, session, ssh, supervisor, vmm_process, AgentError};

/// The verbs of `keystone agent`.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Start the sandbox of a git project (creating it and its disk on first
    /// use), wait until the guest is ready, then attach. Exit codes: 0 ok,
    /// 1 not a git repository, 2 already running or bad usage, 3 image,
    /// disk or boot failed, 4 KVM not available.
    Start(StartArgs),
    /// Stop a sandbox (its disk is kept).
    Stop(StopArgs),
    /// Show one sandbox.
    Status(StatusArgs),
    /// List the sandboxes.
    List(ListArgs),
    /// Stop a sandbox and delete it with its disk.
    Destroy(DestroyArgs),
    /// Open an interactive shell in the sandbox's /workspace (SSH over vsock).
    #[command(visible_alias = "ssh")]
    Attach(AttachArgs),
    /// Run a command in the sandbox's /workspace; its exit code is passed
    /// through (a TTY only when stdin is one).
    Exec(ExecArgs),
    /// Bring the sandbox's commits to the host (git fetch over SSH over
    /// vsock into refs/keystone/<name>/*, then fast-forward the current
    /// branch when safe). Exit codes: 0 synced, 1 sandbox not found or not
    /// running, 2 nothing to sync, 3 cannot fast-forward.
    Sync(SyncArgs),
    /// Bridge stdin/stdout to a guest vsock port (ssh's ProxyCommand).
    Proxy(ProxyArgs),
    /// Print ssh_config stanzas so `ssh keystone-<name>` (and editors'
    /// remote SSH) reach the sandboxes.
    SshConfig(SshConfigArgs),
    /// Ports both ways over the sandbox's SSH connection (vsock): publish a
    /// guest port on the host's 127.0.0.1, or let the guest reach one host
    /// 127.0.0.1 port. Kept across restarts. Exit codes: 0 done, 1 no such
    /// sandbox or forward, or the forward failed (port taken), 2 bad usage
    /// or the port is already forwarded.
    Port(PortArgs),
    /// The egress policy of a `--network policy` sandbox (host patterns:
    /// `NAME`, `*.SUFFIX`, with `:PORT` or `:*`; without one, 443 and 80)
    /// and its proxy's audit log. Changes apply to a running sandbox at
    /// once. Exit codes: 0 done, 1 no such sandbox, 2 bad pattern.
    Net(NetArgs),
    /// Save a running sandbox's memory, CPU and device state with a
    /// consistent copy of its disk under `snapshots/<tag>/` (the VM is
    /// paused meanwhile), or list them. Exit codes: 0 done, 1 no such
    /// sandbox, not running, or the snapshot failed, 2 bad or taken tag.
    Snapshot(SnapshotArgs),
    /// N new sandboxes from one snapshot of NAME (a new one if it runs),
    /// each with its own disk copy, CID, MAC and hostname, and its own
    /// branch keystone/<child> checked out in /workspace (synced like any
    /// sandbox's, into refs/keystone/<child>/*). Exit codes: 0 all run,
    /// 1 no such sandbox, nothing to fork, or a child failed, 2 bad usage,
    /// 3 image, 4 KVM.
    Fork(ForkArgs),
    /// Internal: the per-sandbox supervisor started by `start`.
    #[command(name = "__supervise", hide = true)]
    Supervise(SuperviseArgs),
    /// Internal: run a command, cutting it off once its stdout passes a cap
    /// (sync's fetch, which may ride the SSH master past the proxy's cap).
    #[command(name = "__capped", hide = true)]
    Capped(CappedArgs),
}

/// `--network` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum NetworkArg {
    /// User-mode networking through passt (no privileges needed).
    User,
    /// A tap device you created (give it with --tap).
    Tap,
    /// A macvtap link you created on a host interface (give it with
    /// --tap; needs root or access to its /dev/tapN).
    Macvtap,
    /// A tap device you created and attached to a bridge (give it with --tap).
    Bridge,
    /// No network.
    None,
    /// No network device; HTTP(S) out only through the host's egress proxy,
    /// to the hosts the sandbox's policy allows (`keystone agent net`).
    Policy,
}

/// `--sync-mode` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SyncModeArg {
    /// Only on `keystone agent sync`.
    Manual,
    /// After each commit in the guest.
    AutoCommit,
    /// After a while without workspace changes.
    AutoIdle,
}

/// `keystone agent start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// The project: a directory in a git work tree (default: the current
    /// directory).
    pub path: Option<PathBuf>,
    /// Sandbox name (default: the project directory's name, lower-cased).
    #[arg(long)]
    pub name: Option<String>,
    /// Guest memory in MiB (default 8192, or what this sandbox used last).
    #[arg(long, value_name = "MB", value_parser = clap::value_parser!(u64).range(2048..=1_048_576))]
    pub memory: Option<u64>,
    /// vCPUs (default 4, or what this sandbox used last).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=64))]
    pub vcpus: Option<u8>,
    /// Offer vmx/svm to the guest (nested virtualization) for this boot;
    /// off by default, since it widens what the guest can reach in KVM.
    #[arg(long, conflicts_with = "no_nested")]
    pub nested: bool,
    /// Hide vmx/svm from the guest: the default, accepted for scripts that
    /// say so.
    #[arg(long)]
    pub no_nested: bool,
    /// Make a new disk from the project (restarting the sandbox if it runs).
    #[arg(long)]
    pub fresh: bool,
    /// Boot, even when the newest snapshot was taken during the sandbox's
    /// last run and could be resumed (its running processes back, in well
    /// under the time of a boot; the disk goes back to the snapshot's).
    #[arg(long, conflicts_with = "fresh")]
    pub cold: bool,
    /// Do not attach once the guest is ready.
    #[arg(long)]
    pub no_attach: bool,
    /// Network (default user, or what this sandbox used last).
    #[arg(long, value_enum)]
    pub network: Option<NetworkArg>,
    /// The tap device for --network tap or bridge, or the macvtap link for
    /// --network macvtap.
    #[arg(long, value_name = "NAME")]
    pub tap: Option<String>,
    /// When the guest's commits are synced to the host (default manual).
    #[arg(long, value_enum)]
    pub sync_mode: Option<SyncModeArg>,
}

/// `keystone agent stop`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// Sandbox (default: the current project's).
    pub name: Option<String>,
    /// Sync the guest's commits to the host first.
    #[arg(long)]
    pub sync: bool,
}

/// `keystone agent status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Sandbox (default: the current project's).
    pub name: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `keystone agent list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `keystone agent destroy`.
#[derive(Debug, Args)]
pub struct DestroyArgs {
    /// Sandbox.
    pub name: String,
    /// Do not ask, and destroy even with unsynced commits.
    #[arg(long)]
    pub force: bool,
}

/// `keystone agent attach` / `ssh`.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Sandbox (default: the current project's).
    pub name: Option<String>,
}

/// `keystone agent exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Sandbox (default: the current project's).
    pub name: Option<String>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// `keystone agent sync`.
#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Sandbox (default: the current project's).
    pub name: Option<String>,
    /// Show what would sync; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also copy dist/ build/ target/ .next/ out/ from the guest (regular
    /// files and directories only; symlinks and escaping paths are refused).
    #[arg(long)]
    pub artifacts: bool,
    /// Fast-forward even when the sandbox changed files the host runs or
    /// obeys (git hooks, package.json, Makefile, .envrc, CI workflows, ...),
    /// which sync otherwise lists and leaves in refs/keystone/.
    #[arg(long)]
    pub allow_executable_changes: bool,
}

/// `keystone agent proxy`.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// `<name> <port>`, or `<port>` with --socket.
    #[arg(required = true, num_args = 1..=2, value_name = "NAME PORT")]
    pub args: Vec<String>,
    /// A VMM's vsock Unix socket instead of a sandbox name.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Cut the connection (exit 1) once more than N bytes came from the
    /// guest.
    #[arg(long, value_name = "N")]
    pub max_bytes: Option<u64>,
}

/// `keystone agent ssh-config`.
#[derive(Debug, Args)]
pub struct SshConfigArgs {
    /// Only this sandbox (default: all).
    pub name: Option<String>,
}

/// `keystone agent snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The sandbox.
    pub name: String,
    /// The snapshot's name (default: the time, in Unix seconds).
    #[arg(long, value_name = "TAG", conflicts_with = "list")]
    pub tag: Option<String>,
    /// List its snapshots instead.
    #[arg(long)]
    pub list: bool,
    /// With --list: JSON.
    #[arg(long, requires = "list")]
    pub json: bool,
}

/// `keystone agent fork`.
#[derive(Debug, Args)]
pub struct ForkArgs {
    /// The sandbox to fork.
    pub name: String,
    /// How many children.
    #[arg(value_name = "N", value_parser = clap::value_parser!(u32).range(1..=super::fork::MAX_CHILDREN as i64))]
    pub count: u32,
    /// Children are named PREFIX-1, PREFIX-2, ... (default NAME-fork),
    /// counting on from the highest that exists.
    #[arg(long, value_name = "PREFIX")]
    pub prefix: Option<String>,
    /// Restore this snapshot of NAME (default: a new one if NAME runs,
    /// else its newest).
    #[arg(long, value_name = "TAG")]
    pub snapshot: Option<String>,
}

/// `keystone agent port`.
#[derive(Debug, Args)]
pub struct PortArgs {
    /// The sandbox.
    pub name: String,
    /// What to do.
    #[command(subcommand)]
    pub action: PortAction,
}

/// `keystone agent port NAME ...`.
#[derive(Debug, Subcommand)]
pub enum PortAction {
    /// The host listens on 127.0.0.1:HOST_PORT (default: GUEST_PORT) and
    /// forwards each connection to the guest's 127.0.0.1:GUEST_PORT.
    Publish {
        /// GUEST_PORT[:HOST_PORT].
        #[arg(value_name = "GUEST_PORT[:HOST_PORT]", value_parser = parse_publish)]
        spec: (u16, u16),
    },
    /// Stop publishing GUEST_PORT.
    Unpublish {
        /// The guest port.
        #[arg(value_parser = clap::value_parser!(u16).range(1..))]
        guest_port: u16,
    },
    /// Let the guest reach the host's 127.0.0.1:HOST_PORT, at its own
    /// 127.0.0.1:HOST_PORT (nothing else of the host's loopback).
    Reach {
        /// The host port.
        #[arg(value_parser = clap::value_parser!(u16).range(1..))]
        host_port: u16,
    },
    /// Stop letting the guest reach HOST_PORT.
    Unreach {
        /// The host port.
        #[arg(value_parser = clap::value_parser!(u16).range(1..))]
        host_port: u16,
    },
    /// List the sandbox's forwards.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

fn parse_publish(spec: &str) -> Result<(u16, u16), String> {
    ports::parse_publish(spec)
}

/// `keystone agent net`.
#[derive(Debug, Args)]
pub struct NetArgs {
    /// The sandbox.
    pub name: String,
    /// What to do.
    #[command(subcommand)]
    pub action: NetAction,
}

/// `keystone agent net NAME ...`.
#[derive(Debug, Subcommand)]
pub enum NetAction {
    /// Print the policy.
    Show {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Let the guest reach hosts matching PATTERN (taken off the deny list).
    Allow {
        /// Host patterns.
        #[arg(required = true)]
        patterns: Vec<String>,
    },
    /// Refuse hosts matching PATTERN, whatever the allow list says.
    Deny {
        /// Host patterns.
        #[arg(required = true)]
        patterns: Vec<String>,
    },
    /// Every connection attempt: time, target, decision and why, bytes each
    /// way, URL of plain HTTP.
    Log {
        /// Keep printing new attempts.
        #[arg(long)]
        follow: bool,
        /// JSON lines.
        #[arg(long)]
        json: bool,
    },
}

/// `keystone agent __capped`.
#[derive(Debug, Args)]
pub struct CappedArgs {
    /// Most bytes passed on from the command's stdout; past it the command
    /// is killed and this exits 255.
    #[arg(long, value_name = "N")]
    pub max_bytes: u64,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// `keystone agent __supervise`.
#[derive(Debug, Args)]
pub struct SuperviseArgs {
    /// The agent root the sandbox is registered under.
    #[arg(long)]
    pub root: PathBuf,
    /// Sandbox.
    pub name: String,
}

fn proxy(paths: &AgentPaths, a: ProxyArgs) -> u8 {
    let (name, port) = match (a.socket.is_some(), a.args.as_slice()) {
        (false, [name, port]) => (Some(name.as_str()), port),
        (true, [port]) => (None, port),
        _ => {
            return fail(&AgentError::Usage(
                "proxy takes <name> <port>, or --socket PATH <port>".into(),
            ))
        }
    };
    let Ok(port) = port.parse::<u32>() else {
        return fail(&AgentError::Usage(format!(
            "'{port}' is not a vsock port number"
        )));
    };
    match remote::proxy(paths, name, a.socket.as_deref(), port, a.max_bytes) {
        Ok(()) => exit::OK,
        Err(e) => fail(&e),
    }
}

fn fail(e: &AgentError) -> u8 {
    eprintln!("keystone: error: {e}");
    print_console(e);
    e.exit_code()
}

/// The console and VMM log tails a boot failure carries, to stderr.
fn print_console(e: &AgentError) {
    if let AgentError::Boot { console, .. } = e {
        if !console.is_empty() {
            eprint!("{console}");
        }
    }
}

/// One sandbox as JSON: the registry entry with the observed status, plus
/// `pid` (the VMM's, while it runs) and `running`.
#[derive(Serialize)]
struct SandboxJson<'a> {
    #[serde(flatten)]
    sandbox: &'a Sandbox,
    pid: Option<u32>,
    running: bool,
    snapshots: Vec<String>,
}

fn json_of(s: &Sandbox) -> SandboxJson<'_> {
    SandboxJson {
        sandbox: s,
        pid: s.vmm.map(|p| p.pid),
        running: s.status == super::state::Status::Running,
        snapshots: super::snapshot::list_of(s)
            .into_iter()
            .map(|i| i.tag)
            .collect(),
    }
}

fn print_json(value: &impl Serialize) -> u8 {
    match serde_json::to_string_pretty(value) {
        Ok(j) => {
            println!("{j}");
            exit::OK
        }
        Err(e) => fail(&AgentError::Internal(e.to_string())),
    }
}

fn human_status(s: &Sandbox) -> String {
    let opt = |v: Option<u64>| v.map(format_time).unwrap_or_else(|| "-".into());
    let pid = |p: Option<super::state::ProcessId>| {
        p.map(|p| p.pid.to_string()).unwrap_or_else(|| "-".into())
    };
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<12}{v}\n"));
    line("name:", s.name.clone());
    line("status:", s.status.as_str().into());
    line("project:", s.project_path.display().to_string());
    line("pid:", pid(s.vmm));
    line("supervisor:", pid(s.supervisor));
    line("cid:", s.cid.to_string());
    line("socket:", s.vsock_uds.display().to_string());
    line("memory:", format!("{} MiB", s.memory_mib));
    line("vcpus:", s.vcpus.to_string());
    line("nested:", if s.nested { "yes" } else { "no" }.into());
    line("network:", s.network.to_string());
    line("sync mode:", s.sync_mode.as_str().into());
    line("disk:", s.disk.display().to_string());
    let snaps: Vec<String> = super::snapshot::list_of(s)
        .into_iter()
        .map(|i| i.tag)
        .collect();
    line(
        "snapshots:",
        if snaps.is_empty() {
            "-".into()
        } else {
            snaps.join(", ")
        },
    );
    if let Some(o) = &s.forked_from {
        line(
            "forked from:",
            format!("{} (snapshot {})", o.sandbox, o.snapshot),
        );
    }
    line("state:", s.state_dir.display().to_string());
    line(
        "image:",
        s.image
            .as_ref()
            .map(|i| {
                format!(
                    "{} ({})",
                    i.dir.display(),
                    &i.content_hash[..i.content_hash.len().min(12)]
                )
            })
            .unwrap_or_else(|| "-".into()),
    );
    line("created:", format_time(s.created_at));
    line("started:", opt(s.started_at));
    line("ready:", opt(s.ready_at));
    if s.status != super::state::Status::Running {
        line("stopped:", opt(s.stopped_at));
    }
    for f in &s.ports {
        line("port:", f.to_string());
    }
    if let Some(e) = &s.last_error {
        line("last error:", vmm_process::sanitize_for_terminal(e));
    }
    out
}

fn table(list: &[Sandbox]) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "STATUS".into(),
        "PID".into(),
        "CID".into(),
        "MEMORY".into(),
        "VCPUS".into(),
        "FROM".into(),
        "PROJECT".into(),
    ]];
    for s in list {
        rows.push([
            s.name.clone(),
            s.status.as_str().into(),
            s.vmm
                .map(|p| p.pid.to_string())
                .unwrap_or_else(|| "-".into()),
            s.cid.to_string(),
            format!("{} MiB", s.memory_mib),
            s.vcpus.to_string(),
            s.forked_from
                .as_ref()
                .map(|o| format!("{}@{}", o.sandbox, o.snapshot))
                .unwrap_or_else(|| "-".into()),
            s.project_path.display().to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 7 {
                    c.clone()
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Asks on the terminal; `None` when stdin is not one.
fn ask(prompt: &str) -> Option<bool> {
    if !std::io::stdin().is_terminal() {
        return None;
    }
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer).ok()?;
    Some(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

fn start(paths: &AgentPaths, a: StartArgs) -> u8 {
    let opts = StartOptions {
        path: a.path,
        name: a.name,
        memory_mib: a.memory,
        vcpus: a.vcpus,
        nested: a.nested && !a.no_nested,
        fresh: a.fresh,
        cold: a.cold,
        network: a.network.map(|n| match n {
            NetworkArg::User => NetworkChoice::User,
            NetworkArg::Tap => NetworkChoice::Tap,
            NetworkArg::Macvtap => NetworkChoice::Macvtap,
            NetworkArg::Bridge => NetworkChoice::Bridge,
            NetworkArg::None => NetworkChoice::None,
            NetworkArg::Policy => NetworkChoice::Policy,
        }),
        tap: a.tap,
        sync_mode: a.sync_mode.map(|m| match m {
            SyncModeArg::Manual => SyncMode::Manual,
            SyncModeArg::AutoCommit => SyncMode::AutoCommit,
            SyncModeArg::AutoIdle => SyncMode::AutoIdle,
        }),
    };
    let started = match lifecycle::start(paths, &opts, &mut |note| eprintln!("keystone: {note}")) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let s = &started.sandbox;
    if let Some(d) = &started.new_disk {
        eprintln!(
            "keystone: disk {}: {} branch{}, {} checked out",
            s.disk.display(),
            d.branches,
            if d.branches == 1 { "" } else { "es" },
            d.branch.as_deref().unwrap_or("detached HEAD")
        );
    }
    if let Some(r) = &started.resumed {
        eprintln!(
            "keystone: resumed snapshot {} (the disk as it was at the last stop is kept at {})",
            r.tag,
            r.kept_disk.display()
        );
    }
    if let Some(w) = &started.warning {
        eprintln!("keystone: warning: {w}");
    }
    println!(
        "sandbox {} is running (pid {}, cid {}, {} in {:.1} s)",
        s.name,
        s.vmm
            .map(|p| p.pid.to_string())
            .unwrap_or_else(|| "?".into()),
        s.cid,
        if started.resumed.is_some() {
            "resumed"
        } else {
            "ready"
        },
        started.boot_time.as_secs_f64()
    );
    if a.no_attach {
        return exit::OK;
    }
    if !started.ssh {
        eprintln!(
            "keystone: note: this guest image has no SSH, so there is nothing to attach to (see `keystone agent status {}`)",
            s.name
        );
        return exit::OK;
    }
    match session::attach(s) {
        Ok(_) => exit::OK,
        Err(source) => fail(&AgentError::Attach {
            name: s.name.clone(),
            source,
        }),
    }
}

fn print_policy(p: &super::policy::Policy) {
    for a in &p.allow {
        println!("allow {a}");
    }
    for d in &p.deny {
        println!("deny  {d}");
    }
}

fn net_verb(paths: &AgentPaths, a: NetArgs) -> u8 {
    match a.action {
        NetAction::Show { json } => match net::show(paths, &a.name) {
            Ok((p, note)) => {
                if let Some(n) = note {
                    eprintln!("keystone: note: {n}");
                }
                if json {
                    return print_json(&p);
                }
                print_policy(&p);
                exit::OK
            }
            Err(e) => fail(&e),
        },
        NetAction::Allow { patterns } => match net::change(paths, &a.name, &patterns, true) {
            Ok(_) => {
                println!("sandbox {}: allowed {}", a.name, patterns.join(" "));
                exit::OK
            }
            Err(e) => fail(&e),
        },
        NetAction::Deny { patterns } => match net::change(paths, &a.name, &patterns, false) {
            Ok(_) => {
                println!("sandbox {}: denied {}", a.name, patterns.join(" "));
                exit::OK
            }
            Err(e) => fail(&e),
        },
        NetAction::Log { follow, json } => {
            match net::log(paths, &a.name, json, follow, &mut std::io::stdout().lock()) {
                Ok(()) => exit::OK,
                Err(e) => fail(&e),
            }
        }
    }
}

fn port(paths: &AgentPaths, a: PortArgs) -> u8 {
    let change = match a.action {
        PortAction::List { json } => {
            return match ports::list(paths, &a.name) {
                Ok(list) if json => print_json(&list),
                Ok(list) => {
                    for f in &list {
                        println!("{f}");
                    }
                    if list.is_empty() {
                        eprintln!("keystone: sandbox {} forwards no ports", a.name);
                    }
                    exit::OK
                }
                Err(e) => fail(&e),
            };
        }
        PortAction::Publish {
            spec: (guest, host),
        } => ports::PortChange::Publish { guest, host },
        PortAction::Unpublish { guest_port } => ports::PortChange::Unpublish { guest: guest_port },
        PortAction::Reach { host_port } => ports::PortChange::Reach { host: host_port },
        PortAction::Unreach { host_port } => ports::PortChange::Unreach { host: host_port },
    };
    match ports::change(paths, &a.name, change) {
        Ok(c) => {
            let when = match (c.added, c.live) {
                (true, true) => "now",
                (true, false) => "from the next start",
                (false, true) => "removed",
                (false, false) => "removed (the sandbox is not running)",
            };
            println!("sandbox {}: {} ({when})", c.sandbox, c.forward);
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

fn fork_verb(paths: &AgentPaths, a: ForkArgs) -> u8 {
    let opts = super::fork::ForkOptions {
        name: a.name,
        count: a.count,
        prefix: a.prefix,
        snapshot: a.snapshot,
    };
    let f = match super::fork::fork(paths, &opts, &mut |n| eprintln!("keystone: {n}")) {
        Ok(f) => f,
        Err(e) => return fail(&e),
    };
    for c in &f.children {
        println!(
            "sandbox {} is running (pid {}, cid {}, branch {}, ready in {:.1} s)",
            c.sandbox.name,
            c.sandbox
                .vmm
                .map(|p| p.pid.to_string())
                .unwrap_or_else(|| "?".into()),
            c.sandbox.cid,
            c.branch,
            c.ready.as_secs_f64()
        );
    }
    for (name, e) in &f.failed {
        eprintln!("keystone: error: fork {name}: {e}");
        print_console(e);
    }
    eprintln!(
        "keystone: {} of {} children from snapshot {}{} in {:.1} s",
        f.children.len(),
        f.children.len() + f.failed.len(),
        f.snapshot.tag,
        if f.new_snapshot { " (taken now)" } else { "" },
        f.elapsed.as_secs_f64()
    );
    if f.failed.is_empty() {
        exit::OK
    } else {
        exit::FAILURE
    }
}

fn snapshot_verb(paths: &AgentPaths, a: SnapshotArgs) -> u8 {
    if a.list {
        return match paths.registry().find(Some(&a.name)) {
            Ok(s) => {
                let list = super::snapshot::list_of(&s);
                if a.json {
                    return print_json(&list);
                }
                for i in &list {
                    println!(
                        "{}  {}  {} MiB stored  paused {} ms",
                        i.tag,
                        format_time(i.created_at),
                        i.memory_stored >> 20,
                        i.paused_ms
                    );
                }
                if list.is_empty() {
                    eprintln!("keystone: sandbox {} has no snapshots", a.name);
                }
                exit::OK
            }
            Err(e) => fail(&e.into()),
        };
    }
    match super::snapshot::take(paths, &a.name, a.tag.as_deref(), false) {
        Ok(i) => {
            println!(
                "sandbox {}: snapshot {} ({} MiB of memory stored, disk copied, paused {} ms)",
                a.name,
                i.tag,
                i.memory_stored >> 20,
                i.paused_ms
            );
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

/// Runs one `keystone agent` verb; returns the exit code.
pub fn run(cmd: AgentCommand) -> u8 {
    if let AgentCommand::Supervise(a) = cmd {
        return match supervisor::supervise(
            &AgentPaths::at(a.root),
            &a.name,
            session::supervisor_hooks(),
        ) {
            Ok(()) => exit::OK,
            Err(e) => fail(&e),
        };
    }
    let paths = match AgentPaths::from_env() {
        Ok(p) => p,
        Err(e) => return fail(&e.into()),
    };
    match cmd {
        AgentCommand::Start(a) => start(&paths, a),
        AgentCommand::Stop(a) => match lifecycle::stop(&paths, a.name.as_deref(), a.sync) {
            Ok(r) => {
                if let Some(w) = r.sync_warning {
                    eprintln!(
                        "keystone: warning: sync before stop failed: {w}; stopping anyway (the commits stay on the sandbox disk)"
                    );
                }
                if r.was_running {
                    println!("sandbox {} stopped", r.name);
                } else {
                    println!("sandbox {} is not running", r.name);
                }
                exit::OK
            }
            Err(e) => fail(&e),
        },
        AgentCommand::Status(a) => match lifecycle::status(&paths, a.name.as_deref()) {
            Ok(s) if a.json => print_json(&json_of(&s)),
            Ok(s) => {
                print!("{}", human_status(&s));
                exit::OK
            }
            Err(e) => fail(&e),
        },
        AgentCommand::List(a) => match lifecycle::list(&paths) {
            Ok(list) if a.json => print_json(&list.iter().map(json_of).collect::<Vec<_>>()),
            Ok(list) if list.is_empty() => {
                eprintln!("keystone: no sandboxes (start one with `keystone agent start`)");
                exit::OK
            }
            Ok(list) => {
                print!("{}", table(&list));
                exit::OK
            }
            Err(e) => fail(&e),
        },
        AgentCommand::Destroy(a) => match lifecycle::destroy(&paths, &a.name, a.force, &mut ask) {
            Ok(()) => {
                println!("sandbox {} destroyed", a.name);
                exit::OK
            }
            Err(e) => fail(&e),
        },
        AgentCommand::Attach(a) => {
            remote::attach(&paths, a.name.as_deref()).unwrap_or_else(|e| fail(&e))
        }
        AgentCommand::Exec(a) => {
            remote::exec(&paths, a.name.as_deref(), &a.cmd).unwrap_or_else(|e| fail(&e))
        }
        AgentCommand::Sync(a) => {
            let opts = session::SyncOptions {
                dry_run: a.dry_run,
                artifacts: a.artifacts,
                allow_executable: a.allow_executable_changes,
            };
            match remote::sync(&paths, a.name.as_deref(), opts) {
                Ok(r) => {
                    print!("{}", r.text);
                    r.code
                }
                Err(e) => fail(&e),
            }
        }
        AgentCommand::Proxy(a) => proxy(&paths, a),
        AgentCommand::SshConfig(a) => match remote::ssh_config(&paths, a.name.as_deref()) {
            Ok(text) => {
                print!("{text}");
                exit::OK
            }
            Err(e) => fail(&e),
        },
        AgentCommand::Port(a) => port(&paths, a),
        AgentCommand::Snapshot(a) => snapshot_verb(&paths, a),
        AgentCommand::Fork(a) => fork_verb(&paths, a),
        AgentCommand::Net(a) => net_verb(&paths, a),
        AgentCommand::Supervise(_) => exit::OK,
        AgentCommand::Capped(a) => {
            match ssh::capped(a.max_bytes, &a.cmd, &mut std::io::stdout().lock()) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("keystone: error: {e}");
                    255
                }
            }
        }
    }
}
