//! The control API (`--api-sock PATH`): one JSON object per line each way
//! over a Unix stream socket, any number of requests per connection.
//!
//! | request | effect | reply (besides `"ok": true`) |
//! |---|---|---|
//! | `{"op":"state"}` | none | `state` (`running`/`paused`), `vcpus`, `memory_mib`, `version` |
//! | `{"op":"pause"}` | vCPUs leave KVM_RUN and wait | `state`, `ms` |
//! | `{"op":"resume"}` | they run again | `state` |
//! | `{"op":"snapshot"}` | pauses (if running), writes `state.json` + `memory` into `--snapshot-dir`, returns to the state it found | `state`, `dir`, `memory_bytes` (stored, holes excluded), `ms` |
//!
//! A failure is `{"ok": false, "error": "..."}`; the VM keeps its state.
//! Requests are read on the VMM thread's event loop and carried out
//! between its rounds ([`ApiServer::take_requests`]); a line longer than
//! 4 KiB, or one that does not parse, gets an error reply.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

/// Longest request line.
const LINE_MAX: usize = 4096;
/// Most clients at once.
const CLIENTS_MAX: usize = 16;

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Report the VM's state.
    State,
    /// Pause the vCPUs.
    Pause,
    /// Resume them.
    Resume,
    /// Write a snapshot.
    Snapshot,
}

struct Client {
    id: u64,
    stream: UnixStream,
    buf: Vec<u8>,
}

/// The API socket and its clients, on the VMM thread's event loop.
pub struct ApiServer {
    listener: UnixListener,
    clients: Vec<Client>,
    next_id: u64,
    requests: VecDeque<(u64, Result<Request, String>)>,
}

impl ApiServer {
    /// Listen on `path` (which must not exist).
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(ApiServer {
            listener,
            clients: Vec::new(),
            next_id: 0,
            requests: VecDeque::new(),
        })
    }

    /// The requests read so far, each with its client.
    pub fn take_requests(&mut self) -> Vec<(u64, Result<Request, String>)> {
        self.requests.drain(..).collect()
    }

    /// Send `reply` (one JSON line) to client `id`; a client that cannot
    /// take it is dropped.
    pub fn reply(&mut self, id: u64, reply: &serde_json::Value) {
        let Some(pos) = self.clients.iter().position(|c| c.id == id) else {
            return;
        };
        let mut line = reply.to_string();
        line.push('\n');
        // The stream is non-blocking; a reply is small, and a client that
        // does not read its replies loses its connection.
        if self.clients[pos].stream.write_all(line.as_bytes()).is_err() {
            self.clients.remove(pos);
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            if self.clients.len() >= CLIENTS_MAX || stream.set_nonblocking(true).is_err() {
                continue;
            }
            if ops.add(Events::new(&stream, EventSet::IN)).is_err() {
                continue;
            }
            self.next_id += 1;
            self.clients.push(Client {
                id: self.next_id,
                stream,
                buf: Vec::new(),
            });
        }
    }

    fn read_client(&mut self, pos: usize, ops: &mut EventOps) {
        let c = &mut self.clients[pos];
        let mut chunk = [0u8; 1024];
        let closed = loop {
            match c.stream.read(&mut chunk) {
                Ok(0) => break true,
                Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break true,
            }
            if c.buf.len() > LINE_MAX * 4 {
                break false;
            }
        };
        while let Some(nl) = c.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = c.buf.drain(..=nl).collect();
            let req = if line.len() > LINE_MAX {
                Err(format!("request longer than {LINE_MAX} bytes"))
            } else {
                serde_json::from_slice::<Request>(&line).map_err(|e| format!("bad request: {e}"))
            };
            self.requests.push_back((c.id, req));
        }
        if c.buf.len() > LINE_MAX {
            c.buf.clear();
            self.requests
                .push_back((c.id, Err(format!("request longer than {LINE_MAX} bytes"))));
        }
        if closed {
            let c = self.clients.remove(pos);
            let _ = ops.remove(Events::new(&c.stream, EventSet::IN));
        }
    }
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("api: cannot watch the socket: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
        } else if let Some(pos) = self.clients.iter().position(|c| c.stream.as_raw_fd() == fd) {
            self.read_client(pos, ops);
        } else {
            let _ = ops.remove(events);
        }
    }
}

/// The client side: send `req` (one JSON object) to the API socket at
/// `sock` and read the one-line reply, waiting at most `timeout` for it.
/// What keystone's agent, the tests and the benchmarks call.
pub fn request(
    sock: &Path,
    req: &str,
    timeout: std::time::Duration,
) -> std::io::Result<serde_json::Value> {
    use std::io::BufRead;
    let s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(timeout))?;
    writeln!(&s, "{req}")?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("reply {line:?}: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_unknown_ones_do_not() {
        let p = |s: &str| serde_json::from_str::<Request>(s);
        assert_eq!(p(r#"{"op":"pause"}"#).unwrap(), Request::Pause);
        assert_eq!(p(r#"{"op":"snapshot"}"#).unwrap(), Request::Snapshot);
        assert_eq!(p(r#"{"op":"state"}"#).unwrap(), Request::State);
        assert!(p(r#"{"op":"explode"}"#).is_err());
        assert!(p("pause").is_err());
    }
}
