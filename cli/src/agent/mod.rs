//! `keystone agent`: sandboxes for coding agents, one microVM per project.
//!
//! In layers, each module importing only those below it:
//!
//! 1. [`disk`] (the persistent disk and the host-side git it needs),
//!    [`state`] (the registry `sandboxes.json`, each sandbox's files, the
//!    lookups), [`logs`] (bounded, rotating sandbox logs), [`policy`] (the
//!    egress policy of `--network policy`) and [`egress`] (its proxy,
//!    which the supervisor runs);
//! 2. the VMM process: [`vmm_process`] (the keystone-vmm argv and the one
//!    place the guest command line is built, spawning the supervisor,
//!    stopping processes, boot logs) and [`supervisor`] (the per-sandbox
//!    process that runs keystone-vmm);
//! 3. the guest session: [`ssh`] (SSH over vsock), [`sync`] (git over it)
//!    and [`session`] (a sandbox's target and key, poweroff, sync runs, the
//!    automatic sync modes);
//! 4. the verbs: [`lifecycle`] (`start`, `stop`, `status`, `list`,
//!    `destroy`), [`remote`] (`attach`/`ssh`, `exec`, `sync`, `proxy`,
//!    `ssh-config`), [`ports`] (`port`: publish and reach over the SSH
//!    master) and [`net`] (`net`: the policy and the audit log);
//! 5. [`cli`]: the clap definitions and the printing.

pub mod cli;
pub mod disk;
pub mod egress;
pub mod fork;
pub mod lifecycle;
pub mod logs;
pub mod mux;
pub mod net;
pub mod policy;
pub mod ports;
pub mod remote;
pub mod session;
pub mod snapshot;
pub mod ssh;
pub mod state;
pub mod supervisor;
pub mod sync;
pub mod vmm_process;

use std::path::PathBuf;

/// Exit codes of the agent verbs.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// `start`: not a git repository. Other verbs: sandbox not found, not
    /// running where it must run, or refused.
    pub const FAILURE: u8 = 1;
    /// Bad usage (clap's code too); `start`: already running.
    pub const USAGE: u8 = 2;
    /// `start`: no image, or the disk could not be made, or the guest did
    /// not boot.
    pub const BOOT: u8 = 3;
    /// `start`: KVM is not available, or cannot run this image.
    pub const NO_KVM: u8 = 4;
}

/// Errors of the agent verbs, each with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The project path is not inside a git work tree.
    #[error("{} is not a git repository", .0.display())]
    NotGitRepo(PathBuf),
    /// An invalid sandbox name.
    #[error(transparent)]
    BadName(#[from] state::BadName),
    /// Options that cannot work together or at all.
    #[error("{0}")]
    Usage(String),
    /// `start` of a sandbox that runs.
    #[error(
        "sandbox {0} is already running (use --fresh to restart it on a new disk, or attach to it)"
    )]
    AlreadyRunning(String),
    /// The name belongs to a sandbox of another project.
    #[error("sandbox {name} belongs to {}: choose another --name", .project.display())]
    NameTaken {
        /// The name.
        name: String,
        /// The other project.
        project: PathBuf,
    },
    /// No usable guest image.
    #[error("{0}")]
    Image(String),
    /// The persistent disk could not be made.
    #[error("preparing the sandbox disk: {0}")]
    Disk(#[from] disk::DiskError),
    /// The guest did not come up; `console` holds the tail of its logs.
    #[error("sandbox {name} did not start: {reason}")]
    Boot {
        /// The sandbox.
        name: String,
        /// Why.
        reason: String,
        /// The last lines of the console and VMM logs (sanitized).
        console: String,
    },
    /// KVM cannot run the sandbox here.
    #[error("{0}")]
    NoKvm(String),
    /// A snapshot could not be taken or read.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// No such sandbox.
    #[error("no sandbox named {0}")]
    NotFound(String),
    /// No sandbox belongs to the current project (or there is no project).
    #[error("{0}")]
    NoProjectSandbox(String),
    /// The sandbox must be running and is not.
    #[error("sandbox {0} is not running")]
    NotRunning(String),
    /// The verb refused (e.g. destroy without confirmation).
    #[error("{0}")]
    Refused(String),
    /// Attaching after a successful start failed.
    #[error("sandbox {name} is running, but attaching failed: {source}")]
    Attach {
        /// The sandbox.
        name: String,
        /// Why.
        source: ssh::SshError,
    },
    /// The SSH master refused a port forward (the host port is taken, the
    /// guest's sshd refused it).
    #[error("{0}")]
    Forward(ssh::SshError),
    /// The registry or a state file.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// Anything else that should not happen.
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::BadName(_)
            | AgentError::Usage(_)
            | AgentError::AlreadyRunning(_)
            | AgentError::NameTaken { .. } => exit::USAGE,
            AgentError::Image(_) | AgentError::Disk(_) | AgentError::Boot { .. } => exit::BOOT,
            AgentError::NoKvm(_) => exit::NO_KVM,
            AgentError::NotGitRepo(_)
            | AgentError::NotFound(_)
            | AgentError::NoProjectSandbox(_)
            | AgentError::NotRunning(_)
            | AgentError::Refused(_)
            | AgentError::Attach { .. }
            | AgentError::Forward(_)
            | AgentError::Snapshot(_)
            | AgentError::State(_)
            | AgentError::Internal(_) => exit::FAILURE,
        }
    }
}

impl From<state::LookupError> for AgentError {
    fn from(e: state::LookupError) -> Self {
        match e {
            state::LookupError::BadName(b) => AgentError::BadName(b),
            state::LookupError::NotFound(n) => AgentError::NotFound(n),
            state::LookupError::NoProjectSandbox(m) => AgentError::NoProjectSandbox(m),
            state::LookupError::State(s) => AgentError::State(s),
        }
    }
}
