//! The egress proxy of a `--network policy` sandbox, run by its
//! supervisor: an HTTP proxy (hyper) on the host end of guest vsock port
//! [`EGRESS_PORT`]. Such a guest has no network device at all; its only
//! way out is this proxy, reached through a loopback listener in the guest
//! (`127.0.0.1:3128`, bridged to the vsock port by the image) that
//! `http_proxy`/`https_proxy` name. A tool that ignores them has no route
//! and fails closed.
//!
//! Each request names its target: `CONNECT host:port` (HTTPS and any
//! tunnelled TCP) or an absolute `http://` URL. The proxy decides by the
//! sandbox's policy file (read again for each request, so a change applies
//! at once), resolves the name itself (the guest needs no DNS, and its
//! queries go nowhere), drops addresses no policy can open
//! ([`policy::blocked_address`]), connects, and writes one JSON line per
//! attempt to `state/net.log` (rotated at [`LOG_CAP`]): time, target,
//! decision and why, the address used, bytes each way, and the URL of a
//! plain HTTP request.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::logs::{RotatingLog, LOG_CAP};
use super::policy::{blocked_address, Decision, Policy};
use super::state::{format_time, now};

/// Host vsock port of the egress proxy (`<vsock uds>_1026`).
pub const EGRESS_PORT: u32 = 1026;
/// Connections served at once; more wait.
const MAX_CONNECTIONS: usize = 256;
/// Resolving a name, connecting, and reading a request's headers.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// One line of `state/net.log`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// When the attempt began (UTC, RFC 3339).
    pub time: String,
    /// The host the guest named.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// `CONNECT`, or the plain HTTP request's method.
    pub method: String,
    /// The URL of a plain HTTP request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `allow` or `deny`.
    pub decision: String,
    /// The pattern that allowed it, or why it was refused (or failed).
    pub reason: String,
    /// The address connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Bytes from the guest to the target.
    pub bytes_up: u64,
    /// Bytes from the target to the guest.
    pub bytes_down: u64,
}

/// What the proxy of one sandbox needs.
pub struct Egress {
    /// The sandbox's policy file.
    pub policy: PathBuf,
    /// `state/net.log`.
    log: Mutex<RotatingLog>,
    /// Addresses never connected to: [`blocked_address`] (only this
    /// module's tests, whose servers are on loopback, narrow it).
    blocked: fn(std::net::IpAddr) -> bool,
}

impl Egress {
    /// The proxy for the policy at `policy`, logging to `log`.
    pub fn new(policy: PathBuf, log: &std::path::Path) -> std::io::Result<Egress> {
        Ok(Egress {
            policy,
            log: Mutex::new(RotatingLog::open(log, LOG_CAP)?),
            blocked: blocked_address,
        })
    }

    fn record(&self, e: &LogEntry) {
        let Ok(mut line) = serde_json::to_vec(e) else {
            return;
        };
        line.push(b'\n');
        if let Ok(mut log) = self.log.lock() {
            let _ = log.write(&line);
        }
    }

    /// Decides on `host:port`, resolves and connects; the stream logs the
    /// attempt when it is dropped. On refusal the attempt is logged now
    /// and the status and reason come back.
    async fn admit(self: &Arc<Self>, mut entry: LogEntry) -> Result<Counted, (StatusCode, String)> {
        let refuse = |mut entry: LogEntry, status: StatusCode, reason: String| {
            entry.decision = "deny".into();
            entry.reason = reason.clone();
            self.record(&entry);
            Err((status, reason))
        };
        let policy = match Policy::load(&self.policy) {
            Ok(p) => p,
            Err(e) => {
                return refuse(
                    entry,
                    StatusCode::FORBIDDEN,
                    format!("no usable policy: {e}"),
                )
            }
        };
        let pattern = match policy.decide(&entry.host, entry.port) {
            Decision::Allow(p) => p,
            Decision::Deny(why) => return refuse(entry, StatusCode::FORBIDDEN, why),
        };
        let target = (entry.host.clone(), entry.port);
        let resolved = tokio::time::timeout(STEP_TIMEOUT, tokio::net::lookup_host(target)).await;
        let addrs: Vec<SocketAddr> = match resolved {
            Ok(Ok(a)) => a.collect(),
            Ok(Err(e)) => {
                return refuse(
                    entry,
                    StatusCode::BAD_GATEWAY,
                    format!("cannot resolve: {e}"),
                )
            }
            Err(_) => {
                return refuse(
                    entry,
                    StatusCode::GATEWAY_TIMEOUT,
                    "resolving timed out".into(),
                )
            }
        };
        let (open, blocked): (Vec<_>, Vec<_>) =
            addrs.into_iter().partition(|a| !(self.blocked)(a.ip()));
        if open.is_empty() {
            let list: Vec<String> = blocked.iter().map(|a| a.ip().to_string()).collect();
            return refuse(
                entry,
                StatusCode::FORBIDDEN,
                format!(
                    "resolves only to addresses no policy opens ({})",
                    list.join(", ")
                ),
            );
        }
        let mut last = String::from("no address");
        for a in open {
            match tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(a)).await {
                Ok(Ok(stream)) => {
                    entry.decision = "allow".into();
                    entry.reason = pattern;
                    entry.address = Some(a.to_string());
                    return Ok(Counted {
                        stream,
                        entry,
                        egress: self.clone(),
                    });
                }
                Ok(Err(e)) => last = format!("connect {a}: {e}"),
                Err(_) => last = format!("connect {a}: timed out"),
            }
        }
        refuse(entry, StatusCode::BAD_GATEWAY, last)
    }
}

/// A connection to an allowed target that counts bytes each way and logs
/// the attempt when it is dropped (the connection is over).
struct Counted {
    stream: TcpStream,
    entry: LogEntry,
    egress: Arc<Egress>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.egress.record(&self.entry);
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before) as u64;
        self.entry.bytes_down = self.entry.bytes_down.saturating_add(n);
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.entry.bytes_up = self.entry.bytes_up.saturating_add(n as u64);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let body = Full::new(Bytes::from(format!("keystone: {msg}\n")))
        .map_err(|never| match never {})
        .boxed();
    let mut r = Response::new(body);
    *r.status_mut() = status;
    // A refusal ends the client's connection.
    r.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    r
}

fn refused(status: StatusCode, reason: &str) -> Response<Body> {
    text(
        status,
        &format!("refused by the sandbox's network policy: {reason}"),
    )
}

/// Headers for the proxy only, never passed on.
const HOP_HEADERS: &[&str] = &[
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

async fn handle(
    egress: Arc<Egress>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, hyper::Error> {
    let base = LogEntry {
        time: format_time(now()),
        method: req.method().to_string(),
        ..LogEntry::default()
    };
    if req.method() == Method::CONNECT {
        let Some((host, port)) = req
            .uri()
            .authority()
            .and_then(|a| Some((a.host().to_string(), a.port_u16()?)))
        else {
            return Ok(text(StatusCode::BAD_REQUEST, "CONNECT needs host:port"));
        };
        let entry = LogEntry { host, port, ..base };
        let mut upstream = match egress.admit(entry).await {
            Ok(s) => s,
            Err((status, why)) => return Ok(refused(status, &why)),
        };
        tokio::spawn(async move {
            if let Ok(up) = hyper::upgrade::on(req).await {
                let mut guest = TokioIo::new(up);
                let _ = tokio::io::copy_bidirectional(&mut guest, &mut upstream).await;
            }
        });
        return Ok(Response::new(
            Empty::new().map_err(|never| match never {}).boxed(),
        ));
    }
    // Plain HTTP: an absolute http:// URL.
    let uri = req.uri().clone();
    let (Some("http"), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return Ok(text(
            StatusCode::BAD_REQUEST,
            "a proxy request needs CONNECT or an absolute http:// URL",
        ));
    };
    let entry = LogEntry {
        host: host.to_string(),
        port: uri.port_u16().unwrap_or(80),
        url: Some(uri.to_string()),
        ..base
    };
    let upstream = match egress.admit(entry).await {
        Ok(s) => s,
        Err((status, why)) => return Ok(refused(status, &why)),
    };
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await
    else {
        return Ok(text(
            StatusCode::BAD_GATEWAY,
            "the upstream connection failed",
        ));
    };
    // The connection (and its log line) ends with this one exchange.
    tokio::spawn(conn);
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let Ok(origin) = path.parse() else {
        return Ok(text(StatusCode::BAD_REQUEST, "bad request path"));
    };
    *req.uri_mut() = origin;
    let headers = req.headers_mut();
    for h in HOP_HEADERS {
        headers.remove(*h);
    }
    if let Ok(v) = hyper::header::HeaderValue::from_str(&host_header(&uri)) {
        headers.insert(hyper::header::HOST, v);
    }
    headers.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    match sender.send_request(req).await {
        Ok(resp) => Ok(resp.map(|b| b.boxed())),
        Err(_) => Ok(text(StatusCode::BAD_GATEWAY, "the upstream request failed")),
    }
}

fn host_header(uri: &hyper::Uri) -> String {
    match (uri.host(), uri.port_u16()) {
        (Some(h), Some(p)) if p != 80 => format!("{h}:{p}"),
        (Some(h), _) => h.to_string(),
        _ => String::new(),
    }
}

/// Serves the proxy on `listener` (the host end of the guest's vsock port
/// [`EGRESS_PORT`]) until the process ends. Each connection is one guest
/// client; at most [`MAX_CONNECTIONS`] at once, headers within
/// [`STEP_TIMEOUT`].
pub fn serve(listener: std::os::unix::net::UnixListener, egress: Egress) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::UnixListener::from_std(listener)?;
        let egress = Arc::new(egress);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return Ok(());
            };
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(_) => {
                    // Out of descriptors, say: a moment, then on.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let egress = egress.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| handle(egress.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(STEP_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
                drop(permit);
            });
        }
    })
}

/// The entries of a `net.log` text (lines that do not parse are skipped).
pub fn parse_log(text: &str) -> Vec<LogEntry> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// One entry as a line for people.
pub fn human_line(e: &LogEntry) -> String {
    let what = e
        .url
        .clone()
        .unwrap_or_else(|| format!("{}:{}", e.host, e.port));
    let what = super::vmm_process::sanitize_for_terminal(&what);
    if e.decision == "allow" {
        format!(
            "{} allow {} {what} ({} up, {} down; {})",
            e.time, e.method, e.bytes_up, e.bytes_down, e.reason
        )
    } else {
        format!(
            "{} DENY  {} {what} ({})",
            e.time,
            e.method,
            super::vmm_process::sanitize_for_terminal(&e.reason)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::os::unix::net::{UnixListener, UnixStream};

    /// A one-line HTTP server on 127.0.0.1 answering every request with
    /// `body`; its port.
    fn http_server(body: &'static str) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        port
    }

    fn proxy(
        dir: &std::path::Path,
        policy: &Policy,
        blocked: fn(std::net::IpAddr) -> bool,
    ) -> PathBuf {
        let sock = dir.join("egress.sock");
        policy.save(&dir.join("policy.json")).unwrap();
        let mut egress = Egress::new(dir.join("policy.json"), &dir.join("net.log")).unwrap();
        egress.blocked = blocked;
        let l = UnixListener::bind(&sock).unwrap();
        std::thread::spawn(move || serve(l, egress));
        sock
    }

    /// Sends `request` to the proxy; everything it answers until it
    /// closes (or 10 s pass).
    fn ask(sock: &std::path::Path, request: &str) -> String {
        let mut c = UnixStream::connect(sock).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(request.as_bytes()).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = c.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    fn entries(dir: &std::path::Path, n: usize) -> Vec<LogEntry> {
        for _ in 0..200 {
            let e = parse_log(&std::fs::read_to_string(dir.join("net.log")).unwrap_or_default());
            if e.len() >= n {
                return e;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("fewer than {n} log entries");
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ks-egress-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn allowed_http_and_connect_go_through_and_the_rest_is_refused_and_logged() {
        let dir = tempdir("allow");
        let port = http_server("hello");
        let policy = Policy {
            allow: vec![format!("localhost:{port}")],
            deny: vec![],
        };
        // Loopback stands in for an outside server here; the real rule is
        // tested below and in the lane.
        let sock = proxy(&dir, &policy, |_| false);
        let url = format!("http://localhost:{port}/path?q=1");
        let plain = ask(
            &sock,
            &format!("GET {url} HTTP/1.1\r\nHost: localhost\r\nProxy-Connection: close\r\nConnection: close\r\n\r\n"),
        );
        assert!(
            plain.starts_with("HTTP/1.1 200") && plain.ends_with("hello"),
            "{plain}"
        );
        let tunnel = ask(
            &sock,
            &format!("CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        );
        assert!(tunnel.starts_with("HTTP/1.1 200"), "{tunnel}");
        assert!(
            tunnel.ends_with("hello"),
            "the tunnel carries the server's reply: {tunnel}"
        );
        // Not in the policy: another port, another name, an address.
        for req in [
            format!(
                "CONNECT localhost:{} HTTP/1.1\r\n\r\n",
                port.wrapping_add(1)
            ),
            "GET http://example.test/ HTTP/1.1\r\nConnection: close\r\n\r\n".to_string(),
            format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n"),
        ] {
            let r = ask(&sock, &req);
            assert!(r.starts_with("HTTP/1.1 403"), "{req}: {r}");
            assert!(r.contains("refused by the sandbox's network policy"), "{r}");
        }
        let log = entries(&dir, 5);
        let find = |pred: &dyn Fn(&LogEntry) -> bool| log.iter().find(|e| pred(e)).cloned();
        let get = find(&|e| e.method == "GET" && e.decision == "allow").expect("GET logged");
        assert_eq!(get.url.as_deref(), Some(url.as_str()));
        assert_eq!((get.host.as_str(), get.port), ("localhost", port));
        assert!(get.bytes_up > 0 && get.bytes_down > 0, "{get:?}");
        let con = find(&|e| e.method == "CONNECT" && e.decision == "allow").expect("CONNECT");
        assert!(con.bytes_down >= 5 && con.url.is_none(), "{con:?}");
        assert_eq!(
            log.iter().filter(|e| e.decision == "deny").count(),
            3,
            "{log:?}"
        );
        assert!(find(&|e| e.reason == "an address, not a host name").is_some());
        // A change to the policy file applies to the next request.
        Policy::default().save(&dir.join("policy.json")).unwrap();
        let r = ask(&sock, &format!("CONNECT localhost:{port} HTTP/1.1\r\n\r\n"));
        assert!(r.starts_with("HTTP/1.1 403"), "{r}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_allowed_name_that_resolves_to_loopback_reaches_nothing() {
        let dir = tempdir("rebind");
        let port = http_server("must not be read");
        let policy = Policy {
            allow: vec!["localhost:*".into()],
            deny: vec![],
        };
        let sock = proxy(&dir, &policy, blocked_address);
        let r = ask(&sock, &format!("CONNECT localhost:{port} HTTP/1.1\r\n\r\n"));
        assert!(r.starts_with("HTTP/1.1 403"), "{r}");
        assert!(
            r.contains("resolves only to addresses no policy opens"),
            "{r}"
        );
        assert!(!r.contains("must not be read"));
        let log = entries(&dir, 1);
        assert_eq!(log[0].decision, "deny");
        assert!(log[0].address.is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn requests_without_a_target_are_bad_requests() {
        let dir = tempdir("bad");
        let sock = proxy(&dir, &Policy::builtin(), blocked_address);
        for req in [
            "GET /relative HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "GET https://github.com/ HTTP/1.1\r\nConnection: close\r\n\r\n",
        ] {
            let r = ask(&sock, req);
            assert!(r.starts_with("HTTP/1.1 400"), "{req}: {r}");
        }
        let r = ask(&sock, "garbage\r\n\r\n");
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 400"), "{r}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
