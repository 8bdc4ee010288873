//! `keystone agent` end to end with a real Linux guest: the unmodified
//! Debian sandbox image booted by keystone-vmm on hardware KVM (on this
//! project's PVM machines, in the nested real-KVM lane: `tests/lane/suites`).
//! Real ssh, real sshd, real git in the guest: start, exec, attach/ssh, sync
//! (every outcome), artifacts, ssh-config, host-key pinning, destroy's guard,
//! ports both ways (publish, reach, removed, restored on restart),
//! snapshot, stop, the restart resuming the snapshot (processes, files,
//! clock), auto-commit sync, fork 3 (hostnames, branches, randomness,
//! refs).
//!
//! One sandbox, booted once and resumed once, walks through every case in
//! order (boots are slow in the nested lane), then three forks of it.

#[path = "common/agent.rs"]
mod agent;
#[path = "common/guest.rs"]
mod guest;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::{code, start_args, stdout, wait_until, World};

#[test]
#[ignore = "lane: boots Linux on keystone-vmm, needs hardware KVM (tests/lane/suites)"]
fn agent_sandbox_over_ssh_and_git() {
    let world = World::new("agent-ssh");
    let w = world.project("proj");
    w.git(&["branch", "feature"]);
    let t0 = Instant::now();
    let vcpus = guest::test_vcpus();
    let out = w.run(&start_args(&vcpus, "none"));
    assert_eq!(code(&out), 0, "start failed");
    eprintln!("start to ready: {:.1} s", t0.elapsed().as_secs_f64());

    // exec: cwd, exit codes, stdin, stderr, both branches cloned.
    let out = w.run(&["agent", "exec", "proj", "--", "pwd"]);
    assert_eq!((code(&out), stdout(&out).trim()), (0, "/workspace"));
    assert_eq!(code(&w.exec("exit 7")), 7, "exit code passed through");
    let mut child = w
        .cmd(&["agent", "exec", "proj", "--", "tr", "a-z", "A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello from stdin\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(stdout(&out), "HELLO FROM STDIN\n");
    let out = w.exec("echo to-stderr >&2");
    assert!(String::from_utf8_lossy(&out.stderr).contains("to-stderr"));
    let out = w.exec(
        "git branch --format='%(refname:short)'; git rev-parse --abbrev-ref HEAD; git remote",
    );
    assert_eq!(
        stdout(&out),
        "feature\nmain\nmain\n",
        "all branches, current checked out, no remote"
    );

    // attach / ssh without a terminal: a login shell in /workspace on stdin.
    for verb in ["attach", "ssh"] {
        let mut child = w
            .cmd(&["agent", verb, "proj"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"echo \"in $(pwd) as $(id -un)\"; exit 3\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(code(&out), 3, "{verb}");
        assert!(
            stdout(&out).contains("in /workspace as sandbox"),
            "{verb}: {}",
            stdout(&out)
        );
    }

    // One SSH master carries the commands; `start` made it, checking the
    // pinned host key then. exec rides it: with the ProxyCommand broken
    // (KEYSTONE_CLI names nothing) it still works, and without the master
    // (KEYSTONE_SSH_MASTER=off) it cannot connect.
    let state = world
        .root
        .join("config/keystone/agent/sandboxes/proj/state");
    let (sock, pid1) = ssh_master(&state).expect("start opened an SSH master");
    let broken = |off: bool, args: &[&str]| {
        let mut c = w.cmd(args);
        c.env("KEYSTONE_CLI", "/nonexistent/keystone");
        if off {
            c.env("KEYSTONE_SSH_MASTER", "off");
        }
        c.output().unwrap()
    };
    let out = broken(
        false,
        &["agent", "exec", "proj", "--", "echo", "via-master"],
    );
    assert_eq!((code(&out), stdout(&out).trim()), (0, "via-master"));
    let out = broken(
        false,
        &["agent", "exec", "proj", "--", "sh", "-c", "exit 9"],
    );
    assert_eq!(code(&out), 9, "exit code through the master");
    let out = broken(true, &["agent", "exec", "proj", "--", "true"]);
    assert_eq!(code(&out), 255, "no master, no proxy: no connection");
    // A non-interactive exec starts no ssh at all (none on PATH here): it
    // hands its stdin/stdout/stderr to the master over the control socket,
    // and they stream as before.
    let mut c = w.cmd(&[
        "agent",
        "exec",
        "proj",
        "--",
        "sh",
        "-c",
        "cat; echo to-stderr >&2; exit 4",
    ]);
    c.env("PATH", "/nonexistent")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"streamed in\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        (
            code(&out),
            stdout(&out).as_str(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        (4, "streamed in\n", "to-stderr"),
        "exec through the mux protocol, no ssh process"
    );
    // A killed master is made again by the next command: one, for two
    // commands at once, under the same (pinned-key) socket.
    // SAFETY: kill(2) with a pid read from the master's own report.
    assert_eq!(unsafe { libc::kill(pid1 as i32, libc::SIGKILL) }, 0);
    wait_until("the killed master to go", Duration::from_secs(10), || {
        ssh_master(&state).is_none()
    });
    let both: Vec<_> = ["A", "B"]
        .iter()
        .map(|tag| {
            w.cmd(&[
                "agent",
                "exec",
                "proj",
                "--",
                "sh",
                "-c",
                &format!("sleep 1; echo {tag}"),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let outs: Vec<_> = both
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    assert_eq!((code(&outs[0]), stdout(&outs[0]).trim()), (0, "A"));
    assert_eq!((code(&outs[1]), stdout(&outs[1]).trim()), (0, "B"));
    let (sock2, pid2) = ssh_master(&state).expect("the master was made again");
    assert_eq!(sock2, sock);
    assert_ne!(pid2, pid1);
    assert_eq!(
        masters_running(&sock),
        1,
        "one master for concurrent commands"
    );

    // sync: nothing, then dry run, then a real fast-forward.
    let host_head = w.git(&["rev-parse", "HEAD"]);
    assert_eq!(code(&w.run(&["agent", "sync"])), 2, "nothing to sync");
    w.guest_commit("guest one");
    let out = w.run(&["agent", "sync", "--dry-run"]);
    assert_eq!(code(&out), 0);
    assert!(stdout(&out).contains("New commits in sandbox:") && stdout(&out).contains("guest one"));
    assert_eq!(
        w.git(&["rev-parse", "HEAD"]),
        host_head,
        "dry run moved HEAD"
    );
    assert_eq!(
        w.git(&["for-each-ref", "refs/keystone"]),
        "",
        "dry run fetched"
    );
    let out = w.run(&["agent", "sync"]);
    assert_eq!(code(&out), 0);
    assert_eq!(w.head_subject(), "guest one");
    assert_ne!(w.git(&["rev-parse", "refs/keystone/proj/main"]), "");
    assert_eq!(
        w.git(&["rev-parse", "--abbrev-ref", "HEAD"]),
        "main",
        "host branch unchanged"
    );

    // Dirty guest: uncommitted work is listed and never synced.
    let out = w.exec("echo wip > dirty.txt");
    assert_eq!(code(&out), 0);
    let out = w.run(&["agent", "sync"]);
    assert_eq!(code(&out), 2);
    assert!(
        stdout(&out).contains("Uncommitted changes (will NOT sync):")
            && stdout(&out).contains("dirty.txt")
    );
    assert!(!w.dir.join("dirty.txt").exists());

    // Host dirty: fetched, not merged, exact command printed.
    w.guest_commit("guest two");
    std::fs::write(w.dir.join("README.md"), "host edit\n").unwrap();
    let out = w.run(&["agent", "sync"]);
    assert_eq!(code(&out), 3);
    assert!(
        stdout(&out).contains("git stash && git merge --ff-only refs/keystone/proj/main"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        std::fs::read_to_string(w.dir.join("README.md")).unwrap(),
        "host edit\n"
    );
    assert_eq!(w.head_subject(), "guest one");
    w.git(&["checkout", "--", "README.md"]);
    assert_eq!(code(&w.run(&["agent", "sync"])), 0);
    assert_eq!(w.head_subject(), "guest two");

    // A guest commit to a file the host runs (a husky hook): fetched, listed,
    // not fast-forwarded; only an explicit flag brings it into the tree.
    let out = w.exec(
        "mkdir -p .husky && printf '#!/bin/sh\\ntouch /tmp/pwned\\n' > .husky/pre-commit && \
         git add .husky && git -c user.name=Agent -c user.email=agent@sandbox commit -q -m 'guest hook'",
    );
    assert_eq!(code(&out), 0);
    let out = w.run(&["agent", "sync"]);
    assert_eq!(code(&out), 3, "held");
    assert!(
        stdout(&out).contains("NOT fast-forwarded") && stdout(&out).contains("  .husky/pre-commit"),
        "{}",
        stdout(&out)
    );
    assert_eq!(w.head_subject(), "guest two");
    assert!(!w.dir.join(".husky/pre-commit").exists());
    let out = w.run(&["agent", "sync", "--allow-executable-changes"]);
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    assert_eq!(w.head_subject(), "guest hook");
    assert!(w.dir.join(".husky/pre-commit").exists());

    // Diverged: never merged automatically.
    std::fs::write(w.dir.join("host.txt"), "h\n").unwrap();
    w.git(&["add", "host.txt"]);
    w.git(&["commit", "-q", "-m", "host side"]);
    w.guest_commit("guest three");
    let out = w.run(&["agent", "sync"]);
    assert_eq!(code(&out), 3);
    assert!(
        stdout(&out).contains("git merge refs/keystone/proj/main"),
        "{}",
        stdout(&out)
    );
    assert_eq!(w.head_subject(), "host side");
    assert_eq!(
        w.git(&["log", "-1", "--format=%s", "refs/keystone/proj/main"]),
        "guest three"
    );

    // destroy refuses while the guest holds unsynced commits.
    w.guest_commit("guest four");
    let out = w.run(&["agent", "destroy", "proj"]);
    assert_eq!(code(&out), 1);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not synced"),
        "destroy guard"
    );

    // Artifacts: files copied, a hostile symlink refused.
    let outside = world.root.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let out = w.exec("mkdir -p dist/js && echo built > dist/js/app.js && ln -s /etc/passwd dist/passwd && ln -s / dist/root");
    assert_eq!(code(&out), 0);
    let out = w.run(&["agent", "sync", "--artifacts"]);
    assert_eq!(
        std::fs::read_to_string(w.dir.join("dist/js/app.js")).unwrap(),
        "built\n"
    );
    assert!(
        w.dir.join("dist/passwd").symlink_metadata().is_err(),
        "symlink copied"
    );
    assert!(
        w.dir.join("dist/root").symlink_metadata().is_err(),
        "symlink copied"
    );
    assert!(
        stdout(&out).contains("refused dist/passwd"),
        "{}",
        stdout(&out)
    );

    // ssh-config: plain `ssh keystone-proj` works with the printed stanza.
    let out = w.run(&["agent", "ssh-config", "proj"]);
    assert_eq!(code(&out), 0);
    let cfg = world.root.join("ssh_config");
    std::fs::write(&cfg, stdout(&out)).unwrap();
    assert!(stdout(&out).contains("Host keystone-proj"));
    let mut ssh = Command::new("ssh");
    ssh.args(["-F"])
        .arg(&cfg)
        .args(["-o", "BatchMode=yes", "keystone-proj", "cat /etc/hostname"]);
    for (k, v) in &w.env {
        ssh.env(k, v);
    }
    let out = ssh.output().unwrap();
    assert!(
        out.status.success(),
        "ssh via ssh-config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout(&out).trim(), "proj");

    // A changed host key is an error, never accepted.
    let keys = world
        .root
        .join("config/keystone/agent/sandboxes/proj/state/host_keys");
    let good = std::fs::read_to_string(&keys).unwrap();
    std::fs::write(
        &keys,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBxR0KcIaQ7v0X0o8LPr5w8KqkmwM7v0X0o8LPr5w8Kq\n",
    )
    .unwrap();
    let out = w.run(&["agent", "exec", "proj", "--", "true"]);
    assert_eq!(code(&out), 255, "exec with a wrong pinned key must fail");
    std::fs::write(&keys, good).unwrap();

    // Ports both ways over the master (the sandbox has no network at all).
    // publish: the host's 127.0.0.1:18080 reaches a guest server on 8000.
    assert_eq!(code(&w.exec(GUEST_SERVER)), 0, "guest server started");
    let out = w.run(&["agent", "port", "proj", "publish", "8000:18080"]);
    assert_eq!(code(&out), 0, "publish");
    wait_until(
        "the published guest port to answer",
        Duration::from_secs(30),
        || host_read(18080).as_deref() == Some("guest-says-hi\n"),
    );
    // reach: the guest's 127.0.0.1:P reaches the host's 127.0.0.1:P, and
    // no other host loopback port.
    let (reach, reach_hits) = host_server("host-says-hi\n");
    let (other, other_hits) = host_server("must-not-reach\n");
    let reach_s = reach.to_string();
    assert_eq!(
        code(&w.run(&["agent", "port", "proj", "reach", &reach_s])),
        0
    );
    let out = w.exec(&guest_read(reach));
    assert_eq!((code(&out), stdout(&out)), (0, "host-says-hi\n".into()));
    assert_ne!(code(&w.exec(&guest_read(other))), 0, "unlisted host port");
    assert_eq!(other_hits.load(Ordering::SeqCst), 0);
    let st = w.status();
    let ports = st["ports"].as_array().expect("ports in status --json");
    assert_eq!(ports.len(), 2, "{st}");
    assert_eq!(
        (
            &ports[0]["direction"],
            &ports[0]["guest_port"],
            &ports[0]["host_port"]
        ),
        (&"publish".into(), &8000.into(), &18080.into())
    );
    assert_eq!(ports[1]["direction"], "reach");
    // Refused: a host port forwarded already (2), a forward that is not
    // there (1), a port that is not one (2).
    for (args, want) in [
        (["publish", "9000:18080"], 2),
        (["unpublish", "9999"], 1),
        (["publish", "0"], 2),
    ] {
        let mut full = vec!["agent", "port", "proj"];
        full.extend(args);
        assert_eq!(code(&w.run(&full)), want, "{args:?}");
    }
    // Removed: gone at once.
    assert_eq!(
        code(&w.run(&["agent", "port", "proj", "unpublish", "8000"])),
        0
    );
    assert_eq!(
        code(&w.run(&["agent", "port", "proj", "unreach", &reach_s])),
        0
    );
    assert_eq!(host_read(18080), None, "unpublished port still answers");
    assert_ne!(code(&w.exec(&guest_read(reach))), 0, "unreached port");
    assert_eq!(reach_hits.load(Ordering::SeqCst), 1);
    // Kept for the restart below: a forward comes back with the sandbox.
    assert_eq!(
        code(&w.run(&["agent", "port", "proj", "publish", "8000:18080"])),
        0
    );

    // snapshot: memory, CPU and device state with a consistent copy of
    // the disk, the VM paused meanwhile and running on after; a process
    // counting in the background, to find again after the resume.
    assert_eq!(code(&w.exec(COUNTER)), 0);
    std::thread::sleep(Duration::from_secs(1));
    let counted = counter(&w);
    let out = w.run(&["agent", "snapshot", "proj", "--tag", "t1"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout(&out).contains("snapshot t1"), "{}", stdout(&out));
    let snap = world
        .root
        .join("config/keystone/agent/sandboxes/proj/snapshots/t1");
    for f in ["memory", "state.json", "disk.ext4", "meta.json"] {
        assert!(snap.join(f).is_file(), "snapshot file {f} missing");
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("meta.json")).unwrap()).unwrap();
    let mib = meta["memory_mib"].as_u64().unwrap();
    assert_eq!(
        std::fs::metadata(snap.join("memory")).unwrap().len(),
        mib << 20
    );
    assert!(meta["memory_stored"].as_u64().unwrap() > 0, "{meta}");
    assert_eq!(
        std::fs::metadata(snap.join("disk.ext4")).unwrap().len(),
        std::fs::metadata(
            world
                .root
                .join("config/keystone/agent/sandboxes/proj/disk.ext4")
        )
        .unwrap()
        .len(),
        "the disk copy has the disk's size"
    );
    let again = w.run(&["agent", "snapshot", "proj", "--tag", "t1"]);
    assert_eq!(code(&again), 2, "a taken tag");
    assert_eq!(w.status()["snapshots"], serde_json::json!(["t1"]));
    let out = w.run(&["agent", "exec", "proj", "--", "echo", "after-snapshot"]);
    assert_eq!(
        stdout(&out).trim(),
        "after-snapshot",
        "resumed after the snapshot"
    );

    // stop --sync: the pending commit comes home, then the guest powers off.
    w.git(&["reset", "-q", "--hard", "refs/keystone/proj/main"]);
    let out = w.run(&["agent", "stop", "--sync"]);
    assert_eq!(code(&out), 0);
    assert_eq!(w.head_subject(), "guest four");
    let st: serde_json::Value =
        serde_json::from_slice(&w.run(&["agent", "status", "--json"]).stdout).unwrap();
    assert_eq!(st["status"], "stopped", "{st}");
    wait_until(
        "the master to end with the VM",
        Duration::from_secs(15),
        || masters_running(&sock) == 0,
    );
    assert!(
        !sock.exists() && ssh_master(&state).is_none(),
        "a master outlived its VM"
    );

    // Second start: snapshot t1 was taken in the last run, so it resumes
    // (disk back to t1's copy), with auto-commit sync from now on: the
    // counting process runs on, ssh answers with the pinned key, the files
    // are there, the guest's clock is the host's; and a guest commit
    // arrives on the host without asking.
    let t1 = Instant::now();
    let out = w.run(&[
        "agent",
        "start",
        "--no-attach",
        "--sync-mode",
        "auto-commit",
    ]);
    assert_eq!(code(&out), 0);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("resumed snapshot t1"), "{err}");
    assert!(stdout(&out).contains("resumed in"), "{}", stdout(&out));
    assert!(!err.contains("warning"), "{err}");
    eprintln!(
        "restart (resume) to ready: {:.1} s",
        t1.elapsed().as_secs_f64()
    );
    let first = counter(&w);
    assert!(first >= counted, "counter went back: {counted} -> {first}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(counter(&w) > first, "the counting process did not survive");
    assert_eq!(
        stdout(&w.exec("cat dirty.txt")),
        "wip\n",
        "workspace persisted"
    );
    let guest_now: i64 = stdout(&w.exec("date +%s")).trim().parse().unwrap();
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (guest_now - host_now).abs() < 20,
        "guest clock {guest_now}, host {host_now}"
    );
    let proj_dir = world.root.join("config/keystone/agent/sandboxes/proj");
    assert!(proj_dir.join("disk.before-resume.ext4").is_file());
    // Resumed once: the next start boots (t1 predates this run).
    // The published port came back with the new master.
    assert_eq!(code(&w.exec(GUEST_SERVER)), 0, "guest server restarted");
    wait_until(
        "the published port after the restart",
        Duration::from_secs(30),
        || host_read(18080).as_deref() == Some("guest-says-hi\n"),
    );
    w.guest_commit("guest five");
    wait_until("auto-commit sync", Duration::from_secs(120), || {
        w.head_subject() == "guest five"
    });

    // fork 3 of the running sandbox: one new snapshot, three sandboxes
    // side by side, each with its hostname, its branch, its randomness,
    // the parent's processes, and a commit of its own synced into its refs.
    let t2 = Instant::now();
    let out = w.run(&["agent", "fork", "proj", "3"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(code(&out), 0, "{err}");
    eprintln!("fork 3: {:.1} s\n{err}", t2.elapsed().as_secs_f64());
    let children: Vec<agent::Project> = (1..=3)
        .map(|k| agent::Project {
            dir: w.dir.clone(),
            name: format!("proj-fork-{k}"),
            env: w.env.clone(),
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    for c in &children {
        assert!(
            stdout(&out).contains(&format!("sandbox {} is running", c.name)),
            "{}",
            stdout(&out)
        );
        let got = stdout(&c.exec(
            "hostname; git rev-parse --abbrev-ref HEAD; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; echo; cat /tmp/counter",
        ));
        let lines: Vec<&str> = got.lines().collect();
        assert_eq!(lines.len(), 4, "{got}");
        assert_eq!(lines[0], c.name, "hostname");
        assert_eq!(lines[1], format!("keystone/{}", c.name), "branch");
        assert!(seen.insert(lines[2].to_string()), "shared RNG output {got}");
        assert!(
            lines[3].parse::<u64>().unwrap() > first,
            "counter in {}",
            c.name
        );
        let st = c.status();
        assert_eq!(st["forked_from"]["sandbox"], "proj", "{st}");
        assert_eq!(st["status"], "running", "{st}");
        c.guest_commit(&format!("from {}", c.name));
    }
    let cids: std::collections::HashSet<_> = children
        .iter()
        .map(|c| c.status()["cid"].as_u64().unwrap())
        .chain([w.status()["cid"].as_u64().unwrap()])
        .collect();
    assert_eq!(cids.len(), 4, "every sandbox its own CID");
    for c in &children {
        let out = w.run(&["agent", "sync", &c.name]);
        assert!(matches!(code(&out), 0 | 2), "sync {}: {out:?}", c.name);
        let r = format!("refs/keystone/{0}/keystone/{0}", c.name);
        wait_until(
            "the child's commit in its refs",
            Duration::from_secs(60),
            || w.git(&["log", "-1", "--format=%s", &r]) == format!("from {}", c.name),
        );
    }
    assert_eq!(w.head_subject(), "guest five", "children leave main alone");
    let list = stdout(&w.run(&["agent", "list"]));
    assert!(list.contains("proj@fork-"), "{list}");
    for c in &children {
        assert_eq!(code(&w.run(&["agent", "stop", &c.name])), 0);
    }
    assert_eq!(code(&w.run(&["agent", "stop"])), 0);
}

/// A process in the guest writing a count to /tmp/counter five times a
/// second, in the background.
const COUNTER: &str = "setsid -f sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done' </dev/null >/dev/null 2>&1";

/// What the guest's counter says now.
fn counter(w: &agent::Project) -> u64 {
    let out = w.exec("cat /tmp/counter");
    stdout(&out)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{out:?}"))
}

/// A guest server on 127.0.0.1:8000 answering each connection with one
/// line, in the background.
const GUEST_SERVER: &str = r#"setsid -f python3 -c '
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8000))
s.listen()
while True:
    c, _ = s.accept()
    c.sendall(b"guest-says-hi\n")
    c.close()
' </dev/null >/dev/null 2>&1"#;

/// What the host's 127.0.0.1:`port` sends before closing; `None` when
/// nothing listens (or the connection carries nothing).
fn host_read(port: u16) -> Option<String> {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut s = String::new();
    std::io::Read::read_to_string(&mut c, &mut s).ok()?;
    (!s.is_empty()).then_some(s)
}

/// A host server on a free 127.0.0.1 port answering `line`; its port and
/// how many connections it took.
fn host_server(line: &'static str) -> (u16, Arc<AtomicUsize>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            h.fetch_add(1, Ordering::SeqCst);
            let _ = c.write_all(line.as_bytes());
        }
    });
    (port, hits)
}

/// A guest command printing what its 127.0.0.1:`port` sends (fails when
/// nothing listens there).
fn guest_read(port: u16) -> String {
    format!(
        "python3 -c 'import socket; print(socket.create_connection((\"127.0.0.1\", {port}), 10).recv(64).decode(), end=\"\")'"
    )
}

/// The sandbox's SSH master: its control socket in `state` and the pid
/// `ssh -O check` reports, when one answers.
fn ssh_master(state: &std::path::Path) -> Option<(std::path::PathBuf, u32)> {
    let sock = std::fs::read_dir(state)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("mux-"))
        })?;
    let out = Command::new("ssh")
        .args(["-F", "/dev/null", "-o"])
        .arg(format!("ControlPath={}", sock.display()))
        .args(["-O", "check", "keystone-proj"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    let pid = text.split("pid=").nth(1)?.split(')').next()?.parse().ok()?;
    out.status.success().then_some((sock, pid))
}

/// How many master processes serve `sock`.
fn masters_running(sock: &std::path::Path) -> usize {
    let out = Command::new("pgrep")
        .args(["-f", "--"])
        .arg(format!(
            "ControlMaster=yes -o ControlPath={}",
            sock.display()
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}
