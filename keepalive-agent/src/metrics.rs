//! `run --metrics ADDR`: Prometheus text exposition of the pinned counters.
//!
//! A dozen lines of HTTP/1.1 serve `GET /metrics`; pulling in an HTTP stack for one endpoint
//! would cost more than it gives. Each scrape reads the maps afresh, so the numbers are the
//! kernel's own, except that a counter the program took back from is held where it was (see
//! [`hold_highest`]).

use std::{
    collections::{HashMap, VecDeque},
    fmt::Write as _,
    io::ErrorKind,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{Mutex, Notify, Semaphore},
};

use crate::{
    accept::Pacer,
    cgroup::Cgroup2,
    error::Error,
    pin::StateDir,
    privileges::{Cap, Caps},
    status,
};

/// The lowest port any process may listen on without CAP_NET_BIND_SERVICE, in this network
/// namespace (`net.ipv4.ip_unprivileged_port_start`, 1024 unless changed).
pub fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(1024)
}

/// Whether listening on `port` takes CAP_NET_BIND_SERVICE here.
pub fn needs_bind_capability(port: u16) -> bool {
    port != 0 && port < unprivileged_port_start()
}

/// What to do about a port that needs CAP_NET_BIND_SERVICE, which the systemd unit does not
/// grant.
pub fn privileged_port_fix(port: u16) -> String {
    format!(
        "use a port of {} or above, or grant CAP_NET_BIND_SERVICE (in a drop-in for the systemd \
         unit, to both CapabilityBoundingSet= and AmbientCapabilities=) for port {port}",
        unprivileged_port_start()
    )
}

/// Binds the metrics listener (blocking: at start, before anything else is served). A port
/// this process may not bind fails with [`Error::Permission`] (exit 3), which restarting
/// cannot fix; a port in use or an address the host does not have (yet) fails with exit 1,
/// which the systemd unit retries.
pub fn listen(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let bound = std::net::TcpListener::bind(addr).and_then(|listener| {
        listener.set_nonblocking(true)?;
        Ok(listener)
    });
    bound.map_err(|err| match err.kind() {
        ErrorKind::PermissionDenied => {
            let why = if needs_bind_capability(addr.port())
                && !Caps::current().has(Cap::NetBindService)
            {
                privileged_port_fix(addr.port())
            } else {
                "not for want of CAP_NET_BIND_SERVICE: a security module (SELinux, AppArmor) or \
                 a cgroup bind program refused it"
                    .to_owned()
            };
            Error::Permission(format!("cannot listen for metrics on {addr}: {err}; {why}")).into()
        }
        _ => anyhow::Error::new(err).context(format!("failed to listen for metrics on {addr}")),
    })
}

/// Who holds the listeners that keep a new listener off `addr`.
#[derive(Debug, PartialEq, Eq)]
pub enum Holder {
    /// Process `pid` holds every one.
    Agent,
    /// Another process holds at least one.
    Other,
    /// The process's descriptors could not be read (not root), or no listener was found.
    Unknown,
}

/// Tells whether process `pid` (the running agent) holds every TCP listener in this network
/// namespace that conflicts with `addr`: same port, and the same address or a wildcard on
/// either side. From the listeners in /proc/net/tcp{,6} and the socket inodes among the
/// process's descriptors.
pub fn holder(pid: &str, addr: SocketAddr) -> Holder {
    let Ok(fds) = std::fs::read_dir(Path::new("/proc").join(pid).join("fd")) else {
        return Holder::Unknown;
    };
    let own: Vec<u64> = fds
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|link| {
            let link = link.to_str()?;
            link.strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    let conflicting: Vec<u64> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .flat_map(|table| {
            let text = std::fs::read_to_string(table).unwrap_or_default();
            text.lines()
                .skip(1)
                .filter_map(listener)
                .filter(|(local, _)| {
                    local.port() == addr.port()
                        && (local.ip() == addr.ip()
                            || local.ip().is_unspecified()
                            || addr.ip().is_unspecified())
                })
                .map(|(_, inode)| inode)
                .collect::<Vec<_>>()
        })
        .collect();
    match conflicting.iter().all(|inode| own.contains(inode)) {
        _ if conflicting.is_empty() => Holder::Unknown,
        true => Holder::Agent,
        false => Holder::Other,
    }
}

/// The local address and inode of a row of /proc/net/tcp{,6} if it is a listener: local
/// address in field 1 as `ADDR:PORT` in hex (the address as the 32-bit words the kernel keeps
/// in network order, each printed as a native integer), state in field 3 (0A is LISTEN), inode
/// in field 9.
fn listener(line: &str) -> Option<(SocketAddr, u64)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if *fields.get(3)? != "0A" {
        return None;
    }
    let (hex, port) = fields.get(1)?.split_once(':')?;
    let mut bytes = Vec::with_capacity(16);
    for word in hex.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    let port = u16::from_str_radix(port, 16).ok()?;
    Some((SocketAddr::new(ip, port), fields.get(9)?.parse().ok()?))
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// What was exported for a cgroup id listed at the last scrape: the highest `enforced_total`,
/// and the cgroup's name.
struct Held {
    enforced_total: u64,
    cgroup: String,
}

/// [`Held`] by cgroup id.
type Highest = HashMap<u64, Held>;

/// What the endpoint carries from one scrape to the next.
#[derive(Default)]
struct Scrapes {
    highest: Highest,
    /// Stale tracking entries the scrapes found: each walk frees the ones it reports, so
    /// `status` finds none of them afterwards.
    stale: u64,
}

/// Holds each cgroup's `enforced_total` at the highest this agent exported, and forgets the
/// cgroups no longer listed. The program takes a socket released as never covered (enforced
/// before the agent saw its new `off` cgroup) back out of the count, which `status` shows, but
/// a Prometheus counter that goes down reads as a reset, and `rate()` as a jump. A cgroup
/// removed while sockets of it are still open keeps the name it was exported with, where
/// `status` shows `#ID (removed)`: another label value would end its series and start another.
fn hold_highest(rows: &mut [status::CgroupRow], highest: &mut Highest) {
    let mut before = std::mem::take(highest);
    *highest = rows
        .iter_mut()
        .map(|row| {
            if let Some(held) = before.remove(&row.cgroup_id) {
                row.enforced_total = row.enforced_total.max(held.enforced_total);
                if row.cgroup == status::removed_name(row.cgroup_id) {
                    row.cgroup = held.cgroup;
                }
            }
            let held = Held {
                enforced_total: row.enforced_total,
                cgroup: row.cgroup.clone(),
            };
            (row.cgroup_id, held)
        })
        .collect();
}

/// Renders the exposition text.
fn render(state: &StateDir, cgroup2: &Cgroup2, scrapes: &mut Scrapes) -> anyhow::Result<String> {
    let mut snapshot = status::summary(state, cgroup2)?;
    hold_highest(&mut snapshot.cgroups, &mut scrapes.highest);
    scrapes.stale += snapshot.stale_entries;
    let mut out = String::new();
    /// Metric name, type, help, and how to read it from a cgroup's row.
    type Family = (
        &'static str,
        &'static str,
        &'static str,
        fn(&status::CgroupRow) -> u64,
    );
    let families: [Family; 3] = [
        (
            "keepalive_enforced_open",
            "gauge",
            "Enforced TCP sockets open now, by socket cgroup.",
            |row| row.open,
        ),
        (
            "keepalive_enforced_total",
            "counter",
            "TCP sockets given a keepalive policy, by socket cgroup.",
            |row| row.enforced_total,
        ),
        (
            "keepalive_dead_peers_total",
            "counter",
            "Enforced connections the kernel closed because keepalive or the user timeout expired.",
            |row| row.dead_peers,
        ),
    ];
    for (metric, kind, help, value) in families {
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
        for row in &snapshot.cgroups {
            let _ = writeln!(
                out,
                "{metric}{{cgroup=\"{}\",cgroup_id=\"{}\"}} {}",
                escape(&row.cgroup),
                row.cgroup_id,
                value(row)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP keepalive_setsockopt_failures_total bpf_setsockopt calls that failed, by option.\n\
         # TYPE keepalive_setsockopt_failures_total counter"
    );
    for (name, value) in &snapshot.counters {
        if let Some(option) = name.strip_prefix("setsockopt_failed_") {
            let _ = writeln!(
                out,
                "keepalive_setsockopt_failures_total{{option=\"{}\"}} {value}",
                option.to_uppercase()
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP keepalive_events_total Enforcement events counted by the BPF program.\n\
         # TYPE keepalive_events_total counter"
    );
    for (name, value) in &snapshot.counters {
        if !name.starts_with("setsockopt_failed_") {
            let _ = writeln!(out, "keepalive_events_total{{event=\"{name}\"}} {value}");
        }
    }
    let _ = writeln!(
        out,
        "# HELP keepalive_tracked_sockets Entries in the socket tracking map.\n\
         # TYPE keepalive_tracked_sockets gauge\nkeepalive_tracked_sockets {}",
        snapshot.tracked_entries
    );
    let _ = writeln!(
        out,
        "# HELP keepalive_stale_entries_total Tracking entries of sockets that closed unseen, \
         found and freed by this agent's scrapes.\n\
         # TYPE keepalive_stale_entries_total counter\nkeepalive_stale_entries_total {}",
        scrapes.stale
    );
    Ok(out)
}

/// Runs `work` on a thread of its own once no earlier work of `gate` runs any more. The gate
/// is held until `work` returns, also when the request that started it gave up waiting, so
/// however many scrapes arrive, one map walk runs at a time. A thread the kernel will not make
/// (a pids limit, as pods have) fails this scrape, where tokio's blocking pool would panic.
async fn one_at_a_time<G: Send + 'static, T: Send + 'static>(
    gate: &Arc<Mutex<G>>,
    work: impl FnOnce(&mut G) -> T + Send + 'static,
) -> anyhow::Result<T> {
    let mut held = Arc::clone(gate).lock_owned().await;
    let (done, answer) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("metrics".to_owned())
        .spawn(move || {
            let _ = done.send(work(&mut held));
        })
        .context("failed to start a thread to read the maps")?;
    answer
        .await
        .context("the thread reading the maps ended without an answer")
}

/// What a request asks for, from its request line (`METHOD TARGET HTTP/x.y`).
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// `GET` or `HEAD` of `/metrics`, with or without a query.
    Metrics { head: bool },
    /// `GET` or `HEAD` of `/healthz`: 200 without reading the maps, for probes.
    Health { head: bool },
    /// `GET` or `HEAD` of any other target.
    NotFound { head: bool },
    /// Any other method: 405, with the methods served in `Allow`.
    NotAllowed,
    /// Not a request line; `head` when it starts as a `HEAD` request's does, which gets no
    /// body.
    BadRequest { head: bool },
    /// A request line longer than [`MAX_HEAD`]: 414. `head` as above, from the method.
    UriTooLong { head: bool },
    /// A request line, then headers that do not end within [`MAX_HEAD`]: 431.
    HeadersTooLarge { head: bool },
    /// Part of a request, whose rest did not come within [`CLIENT_TIMEOUT`]: 408.
    TimedOut { head: bool },
    /// Part of a request, whose rest had not come when a new connection took its slot: 503.
    Evicted { head: bool },
}

/// How much of a request's head the agent reads.
const MAX_HEAD: usize = 16 * 1024;

impl Route {
    fn head_only(&self) -> bool {
        matches!(
            self,
            Route::Metrics { head: true }
                | Route::Health { head: true }
                | Route::NotFound { head: true }
                | Route::UriTooLong { head: true }
                | Route::HeadersTooLarge { head: true }
                | Route::TimedOut { head: true }
                | Route::Evicted { head: true }
                | Route::BadRequest { head: true }
        )
    }
}

/// Where a request's header block ends (just past the empty line), if `head` holds all of it;
/// line ends may be CRLF or a bare LF (RFC 9112, section 2.2).
fn head_end(head: &[u8]) -> Option<usize> {
    let lf = head.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = head.windows(3).position(|w| w == b"\n\r\n").map(|i| i + 3);
    lf.into_iter().chain(crlf).min()
}

/// What a request asks for, from what was read of its head: up to its end, or [`MAX_HEAD`]
/// bytes or more (the read that passed the limit may carry on past it), or what came before
/// the client stopped sending. Past the limit, where the request line ends tells 414 from 431.
fn route_read(head: &[u8]) -> Route {
    // Empty lines before the request line are ignored (RFC 9112, section 2.2).
    let head = &head[head
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count()..];
    let head_method = head.starts_with(b"HEAD ");
    let line_end = head.iter().position(|&b| b == b'\n');
    if line_end.map_or(head.len() >= MAX_HEAD, |end| end >= MAX_HEAD) {
        return Route::UriTooLong { head: head_method };
    }
    if head_end(head).map_or(head.len() >= MAX_HEAD, |end| end > MAX_HEAD) {
        return Route::HeadersTooLarge { head: head_method };
    }
    route(head)
}

fn route(request: &[u8]) -> Route {
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let parts: Vec<&str> = line
        .strip_suffix('\r')
        .unwrap_or(&line)
        .split(' ')
        .collect();
    let [method, target, version] = parts[..] else {
        return Route::BadRequest {
            head: line.starts_with("HEAD "),
        };
    };
    // Graphic characters only: a CR inside the line (RFC 9112, section 2.2) is not.
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
    let http1 = version
        .strip_prefix("HTTP/1.")
        .is_some_and(|minor| minor.len() == 1 && minor.as_bytes()[0].is_ascii_digit());
    if !token(method) || !token(target) || !http1 {
        return Route::BadRequest {
            head: line.starts_with("HEAD "),
        };
    }
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Route::NotAllowed,
    };
    // The absolute form (`http://node:9977/metrics`), which proxies send and a server must
    // take (RFC 9112, section 3.2.2): the path after the authority, `/` without one.
    let target = match target.split_once("://") {
        Some((scheme, rest))
            if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") =>
        {
            // The authority ends at the path, the query or the fragment.
            let after = &rest[rest.find(['/', '?', '#']).unwrap_or(rest.len())..];
            if after.starts_with('/') { after } else { "/" }
        }
        _ => target,
    };
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    match path {
        "/metrics" => Route::Metrics { head },
        "/healthz" => Route::Health { head },
        _ => Route::NotFound { head },
    }
}

/// The connections that wait for their client, to send its request or to close once answered,
/// oldest first: when every slot is taken, the oldest gives up its own to a new connection, so
/// that clients which connect and send nothing (or take their answer and stay) cannot hold
/// every slot for their whole timeouts and keep scrapes and health probes out.
#[derive(Default)]
struct Waiting {
    next: u64,
    queue: VecDeque<(u64, Arc<Notify>)>,
}

/// Shared between the accept loop and the connections.
type WaitingClients = Arc<std::sync::Mutex<Waiting>>;

/// A connection's place in [`Waiting`] while it waits for its client; leaves it when dropped.
struct WaitTurn {
    waiting: WaitingClients,
    id: u64,
    evicted: Arc<Notify>,
}

impl WaitTurn {
    fn new(waiting: &WaitingClients) -> Self {
        let evicted = Arc::new(Notify::new());
        let mut queue = lock(waiting);
        let id = queue.next;
        queue.next += 1;
        queue.queue.push_back((id, Arc::clone(&evicted)));
        Self {
            waiting: Arc::clone(waiting),
            id,
            evicted,
        }
    }

    /// Completes when the accept loop took this connection's slot for a new one.
    async fn evicted(&self) {
        self.evicted.notified().await;
    }
}

impl Drop for WaitTurn {
    fn drop(&mut self) {
        lock(&self.waiting).queue.retain(|(id, _)| *id != self.id);
    }
}

/// The list of waiting connections; one a panic left behind is still a list.
fn lock(waiting: &WaitingClients) -> std::sync::MutexGuard<'_, Waiting> {
    waiting
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Tells the oldest connection that waits for its client to close, freeing its slot, if one
/// waits. `notify_one` keeps the word for one that is not listening yet.
fn evict_oldest(waiting: &WaitingClients) {
    if let Some((_, evicted)) = lock(waiting).queue.pop_front() {
        evicted.notify_one();
    }
}

async fn respond(
    mut stream: TcpStream,
    state: &StateDir,
    cgroup2: &Cgroup2,
    gate: &Arc<Mutex<Scrapes>>,
    waiting: &WaitingClients,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let turn = WaitTurn::new(waiting);
    let read = tokio::time::timeout(CLIENT_TIMEOUT, async {
        while head.len() < MAX_HEAD {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            // Where the end could be that was not looked for before: a client sending a byte
            // at a time must not make each read scan the whole head again.
            let from = head.len().saturating_sub(2);
            head.extend_from_slice(&buf[..n]);
            // Empty lines before the request line, which are ignored, end no head (they may
            // come in a read of their own).
            let empty = head
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
            if head_end(&head[from.max(empty)..]).is_some() {
                break;
            }
        }
        std::io::Result::Ok(())
    });
    // `None`: evicted.
    let read = tokio::select! {
        read = read => Some(read),
        () = turn.evicted() => None,
    };
    drop(turn);
    let partial = head.starts_with(b"HEAD ");
    let request = match read {
        Some(Ok(read)) => {
            read?;
            route_read(&head)
        }
        // A connection on which nothing came (one a client opened ahead, say) is closed
        // without an answer, as web servers do; part of a request gets 408 (or 503).
        _ if head.is_empty() => return Ok(()),
        Some(Err(_)) => Route::TimedOut { head: partial },
        None => Route::Evicted { head: partial },
    };
    let (status, content_type, body) = match request {
        Route::Metrics { .. } => {
            // Reading the maps takes a status walk (a few ms, hundreds at 200k sockets): off
            // the agent's loop, which also serves signals, the control socket and inotify.
            let (state, cgroup2) = (state.clone(), cgroup2.clone());
            let rendered = tokio::time::timeout(
                CLIENT_TIMEOUT,
                one_at_a_time(gate, move |scrapes| render(&state, &cgroup2, scrapes)),
            )
            .await;
            match rendered {
                Ok(rendered) => match rendered.and_then(|body| body) {
                    Ok(body) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body),
                    Err(err) => (
                        "503 Service Unavailable",
                        "text/plain; charset=utf-8",
                        format!("{err:#}\n"),
                    ),
                },
                // The walk goes on, and the next scrape waits for it.
                Err(_) => (
                    "503 Service Unavailable",
                    "text/plain; charset=utf-8",
                    format!(
                        "reading the maps (after the scrapes before this one) took over {}\n",
                        humantime::format_duration(CLIENT_TIMEOUT)
                    ),
                ),
            }
        }
        // The endpoint answers once the agent is ready (before, connections wait in the
        // queue), and from a thread of its own: an answer says enforcement is in place.
        Route::Health { .. } => ("200 OK", "text/plain; charset=utf-8", "ok\n".to_owned()),
        Route::NotFound { .. } => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "try /metrics\n".to_owned(),
        ),
        Route::NotAllowed => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET and HEAD\n".to_owned(),
        ),
        Route::BadRequest { .. } => (
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "not an HTTP request\n".to_owned(),
        ),
        Route::UriTooLong { .. } => (
            "414 URI Too Long",
            "text/plain; charset=utf-8",
            "request line over 16 KiB\n".to_owned(),
        ),
        Route::HeadersTooLarge { .. } => (
            "431 Request Header Fields Too Large",
            "text/plain; charset=utf-8",
            "request head over 16 KiB\n".to_owned(),
        ),
        Route::TimedOut { .. } => (
            "408 Request Timeout",
            "text/plain; charset=utf-8",
            format!(
                "the request did not come within {}\n",
                humantime::format_duration(CLIENT_TIMEOUT)
            ),
        ),
        Route::Evicted { .. } => (
            "503 Service Unavailable",
            "text/plain; charset=utf-8",
            format!(
                "the request had not come when more than {MAX_CLIENTS} clients were connected, \
                 and this one had waited longest\n"
            ),
        ),
    };
    let allow = if request == Route::NotAllowed {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    );
    // A HEAD request gets the headers a GET would, without the body.
    if !request.head_only() {
        response.push_str(&body);
    }
    tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await??;
    // Closed with request bytes unread (a body, or headers past what was read above), the
    // socket would send a reset, which throws away what of the answer is still in flight:
    // what the client sends is read until it closes too, within bounds, or until a new
    // connection needs the slot.
    let turn = WaitTurn::new(waiting);
    let linger = tokio::time::timeout(LINGER, async {
        let mut unread = 0;
        while unread < MAX_UNREAD {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => unread += n,
            }
        }
    });
    tokio::select! {
        _ = linger => {}
        () = turn.evicted() => {}
    }
    Ok(())
}

/// How long a client has to close its side once it has the whole answer...
const LINGER: Duration = Duration::from_secs(2);
/// ...and how much it may send meanwhile.
const MAX_UNREAD: usize = 1 << 20;

/// How many scrape connections the agent serves at once; one more is accepted to take the
/// slot of the one that has waited longest for its client (see [`Waiting`]), and the rest wait
/// in the listen queue. Each holds a file descriptor for at most [`CLIENT_TIMEOUT`] twice,
/// [`WRITE_TIMEOUT`] and [`LINGER`], and clients that connect and send nothing must not take
/// the descriptors the agent needs for its policy maps and cgroups.
pub const MAX_CLIENTS: usize = 8;

/// How long a new connection waits for the slot of one told to give it up before the next is
/// told.
const EVICTION_WAIT: Duration = Duration::from_millis(100);

/// How long a scrape connection has, from accept, to send its request, and then how long its
/// answer may take to be ready...
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// ...and to be taken.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves scrapes on `listener` (from [`listen`]) until the process exits, on a thread with
/// a runtime of its own: the agent's loop holds its thread through the start, a pass over
/// existing connections or a reload (seconds with hundreds of pods), and a scrape must not
/// wait for that, nor its clients' timeouts either.
pub fn spawn(
    listener: std::net::TcpListener,
    state: StateDir,
    cgroup2: Cgroup2,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the runtime that serves metrics")?;
    std::thread::Builder::new()
        .name("metrics-http".to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => serve(listener, state, cgroup2).await,
                    Err(err) => log::error!("cannot serve metrics: {err}"),
                }
            });
        })
        .context("failed to start the thread that serves metrics")?;
    Ok(())
}

/// Serves scrapes until the process exits.
async fn serve(listener: TcpListener, state: StateDir, cgroup2: Cgroup2) {
    let gate = Arc::new(Mutex::new(Scrapes::default()));
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let waiting = WaitingClients::default();
    let mut pacer = Pacer::new("metrics");
    loop {
        // With every slot taken, the next connection waits in the listen queue until one is
        // free, or takes the slot of the oldest that waits for its client.
        let (stream, slot) = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => (pacer.accept(|| listener.accept()).await.0, slot),
            Err(_) => {
                let (stream, _) = tokio::select! {
                    accepted = pacer.accept(|| listener.accept()) => accepted,
                    Ok(slot) = Arc::clone(&slots).acquire_owned() => {
                        drop(slot);
                        continue;
                    }
                };
                // The one told may have got its request meanwhile, and none may wait: then the
                // next is told, if one waits by then.
                let slot = loop {
                    evict_oldest(&waiting);
                    match tokio::time::timeout(EVICTION_WAIT, Arc::clone(&slots).acquire_owned())
                        .await
                    {
                        Ok(Ok(slot)) => break slot,
                        Ok(Err(_)) => return,
                        Err(_) => {}
                    }
                };
                (stream, slot)
            }
        };
        let state = state.clone();
        let cgroup2 = cgroup2.clone();
        let gate = Arc::clone(&gate);
        let waiting = Arc::clone(&waiting);
        tokio::spawn(async move {
            let _slot = slot;
            // Each step is bounded: the request and the answer by CLIENT_TIMEOUT, its
            // writing by WRITE_TIMEOUT, and the wait for the client to close by LINGER.
            if let Err(err) = respond(stream, &state, &cgroup2, &gate, &waiting).await {
                log::debug!("metrics client: {err}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn listeners_are_read_from_proc_net_tcp_rows_of_either_family() {
        // Rows as this kernel prints them (x86-64: each 32-bit word in native order).
        let v4 = "   0: 0100007F:26F9 00000000:0000 0A 00000000:00000000 00:00000000 \
                  00000000     0        0 482 1 00000000504fb03f 100 0 0 10 0";
        assert_eq!(listener(v4), Some(("127.0.0.1:9977".parse().unwrap(), 482)));
        let v6 = "   1: 0000000000000000FFFF00000100007F:26F9 \
                  00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 \
                  00000000     0        0 77 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            listener(v6),
            Some(("[::ffff:127.0.0.1]:9977".parse().unwrap(), 77))
        );
        let wildcard = "   2: 00000000000000000000000000000000:26F9 \
                        00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 \
                        00000000     0        0 78 1 0000000000000000 100 0 0 10 0";
        assert_eq!(listener(wildcard), Some(("[::]:9977".parse().unwrap(), 78)));
        // Established (01), the header, and garbage are no listeners.
        let established = v4.replace(" 0A ", " 01 ");
        assert_eq!(listener(&established), None);
        assert_eq!(listener("  sl  local_address rem_address   st"), None);
        assert_eq!(listener("0: zz:26F9 0 0A"), None);
    }

    #[test]
    fn requests_are_routed_by_method_and_path() {
        let metrics = Route::Metrics { head: false };
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), metrics);
        assert_eq!(route(b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n"), metrics);
        assert_eq!(
            route(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Route::Metrics { head: true }
        );
        assert_eq!(
            route(b"GET /metricsx HTTP/1.1\r\n\r\n"),
            Route::NotFound { head: false }
        );
        assert_eq!(
            route(b"HEAD / HTTP/1.1\r\n\r\n"),
            Route::NotFound { head: true }
        );
        assert_eq!(
            route(b"GET /healthz HTTP/1.1\r\n\r\n"),
            Route::Health { head: false }
        );
        assert_eq!(
            route(b"HEAD /healthz?x HTTP/1.0\r\n\r\n"),
            Route::Health { head: true }
        );
        // Empty lines before the request line are ignored.
        assert_eq!(route_read(b"\r\n\nGET /metrics HTTP/1.1\r\n\r\n"), metrics);
        // The absolute form, as a proxy sends it.
        for absolute in [
            &b"GET http://node:9977/metrics HTTP/1.1\r\n\r\n"[..],
            b"GET HTTP://[::1]:9977/metrics?x=1 HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(
                route(absolute),
                metrics,
                "{}",
                String::from_utf8_lossy(absolute)
            );
        }
        for elsewhere in [
            &b"GET http://node:9977 HTTP/1.1\r\n\r\n"[..],
            b"GET http://node:9977/metricsx HTTP/1.1\r\n\r\n",
            b"GET ftp://node/metrics HTTP/1.1\r\n\r\n",
            // The authority ends at a query too: this path is `/`.
            b"GET http://node:9977?a=/metrics HTTP/1.1\r\n\r\n",
            b"GET http://node:9977#/metrics HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(
                route(elsewhere),
                Route::NotFound { head: false },
                "{}",
                String::from_utf8_lossy(elsewhere)
            );
        }
        // Heads cut off where the agent stops reading, which may be past the limit (the read
        // that reached it may carry on): where the request line ends tells which.
        let long_target = format!("GET /{} HTTP/1.1", "x".repeat(MAX_HEAD));
        let too_long = Route::UriTooLong { head: false };
        assert_eq!(route_read(long_target.as_bytes()), too_long);
        let ended_past = format!("{long_target}\r\nHost: x\r\n\r\n");
        assert_eq!(route_read(ended_past.as_bytes()), too_long);
        let long_headers = format!("GET /metrics HTTP/1.1\r\nX: {}", "y".repeat(MAX_HEAD));
        let too_large = Route::HeadersTooLarge { head: false };
        assert_eq!(route_read(long_headers.as_bytes()), too_large);
        // Also when the read that passed the limit brought the head's end.
        let ended_past = format!("{long_headers}\r\n\r\n");
        assert_eq!(route_read(ended_past.as_bytes()), too_large);
        // HEAD gets no body with these either.
        let head = format!("HEAD /{} HTTP/1.1", "x".repeat(MAX_HEAD));
        assert!(route_read(head.as_bytes()).head_only());
        let head = format!("HEAD /metrics HTTP/1.1\r\nX: {}", "y".repeat(MAX_HEAD));
        assert!(route_read(head.as_bytes()).head_only());
        // A head of exactly the limit is read whole.
        let padding = MAX_HEAD - "GET /metrics HTTP/1.1\r\nX: \r\n\r\n".len();
        let exact = format!(
            "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
            "y".repeat(padding)
        );
        assert_eq!(exact.len(), MAX_HEAD);
        assert_eq!(route_read(exact.as_bytes()), metrics);
        // Short of the limit, what came before the client stopped is routed as it is.
        assert_eq!(route_read(b"GET /metrics HTTP/1.1\r\nX: y"), metrics);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::NotAllowed);
        assert_eq!(route(b"get /metrics HTTP/1.1\r\n\r\n"), Route::NotAllowed);
        for bad in [
            &b""[..],
            b"\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics SSH-2.0\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            // A CR inside the line, and versions that are not HTTP/1.x.
            b"GET /metrics HTTP/1.1\rX\r\n\r\n",
            b"GET /metrics HTTP/1.\r\n\r\n",
            b"GET /metrics HTTP/1.11\r\n\r\n",
            b"GET /metrics HTTP/2.0\r\n\r\n",
        ] {
            assert_eq!(
                route(bad),
                Route::BadRequest { head: false },
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // One that starts as HEAD does gets no body.
        let bad_head = route(b"HEAD /metrics HTTP/9\r\n\r\n");
        assert_eq!(bad_head, Route::BadRequest { head: true });
        assert!(bad_head.head_only());
    }

    #[tokio::test]
    async fn scrapes_walk_the_maps_one_at_a_time_even_when_they_give_up_waiting() {
        let gate = Arc::new(Mutex::new(()));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let work = || {
            let (running, most) = (Arc::clone(&running), Arc::clone(&most));
            move |(): &mut ()| {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                running.fetch_sub(1, Ordering::SeqCst);
            }
        };
        // Half of the requests time out while their walk runs; the next walk still waits.
        let mut tasks = Vec::new();
        for i in 0..8 {
            let gate = Arc::clone(&gate);
            let work = work();
            tasks.push(tokio::spawn(async move {
                let limit = Duration::from_millis(if i % 2 == 0 { 5 } else { 10_000 });
                let _ = tokio::time::timeout(limit, one_at_a_time(&gate, work)).await;
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let _ = one_at_a_time(&gate, |_| ()).await;
        assert_eq!(most.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_scrape_whose_maps_are_not_read_in_time_gets_503() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client
            .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        // A walk for the scrapes before this one that does not end.
        let gate = Arc::new(Mutex::new(Scrapes::default()));
        let walk = gate.lock().await;
        let started = tokio::time::Instant::now();
        let responding = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move {
                let (state, cgroup2) = (StateDir::new("/nonexistent"), Cgroup2::at("/nonexistent"));
                respond(server, &state, &cgroup2, &gate, &WaitingClients::default()).await
            }
        });
        let mut answer = String::new();
        tokio::time::timeout(CLIENT_TIMEOUT * 6, client.read_to_string(&mut answer))
            .await
            .expect("an answer, not a wait for the walk")
            .unwrap();
        assert_eq!(started.elapsed(), CLIENT_TIMEOUT);
        drop(client);
        responding.await.unwrap().unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n")
                && answer.ends_with(
                    "\r\n\r\nreading the maps (after the scrapes before this one) took over 10s\n"
                ),
            "{answer}"
        );
        drop(walk);
    }

    #[test]
    fn an_enforced_total_the_program_took_back_from_is_held_at_its_highest() {
        let row = |cgroup_id, enforced_total| status::CgroupRow {
            cgroup: format!("/c{cgroup_id}"),
            cgroup_id,
            open: 0,
            enforced_total,
            dead_peers: 0,
        };
        let mut highest = Highest::new();
        let mut scrape = |rows: &[(u64, u64)]| {
            let mut rows: Vec<_> = rows.iter().map(|&(id, total)| row(id, total)).collect();
            hold_highest(&mut rows, &mut highest);
            rows.iter()
                .map(|row| (row.cgroup_id, row.enforced_total))
                .collect::<Vec<_>>()
        };
        assert_eq!(scrape(&[(1, 6), (2, 3)]), [(1, 6), (2, 3)]);
        // Six released as never covered in cgroup 1.
        assert_eq!(scrape(&[(1, 0), (2, 4)]), [(1, 6), (2, 4)]);
        assert_eq!(scrape(&[(1, 5), (2, 4)]), [(1, 6), (2, 4)]);
        assert_eq!(scrape(&[(1, 8), (2, 4)]), [(1, 8), (2, 4)]);
        // Cgroup 2 removed, and its id's row gone: a new count starts from the map's.
        assert_eq!(scrape(&[(1, 8)]), [(1, 8)]);
        assert_eq!(scrape(&[(1, 8), (2, 1)]), [(1, 8), (2, 1)]);
    }

    #[test]
    fn a_cgroup_removed_with_sockets_open_keeps_the_name_it_was_exported_with() {
        let row = |cgroup: String, enforced_total| status::CgroupRow {
            cgroup,
            cgroup_id: 7,
            open: 1,
            enforced_total,
            dead_peers: 0,
        };
        let mut highest = Highest::new();
        let mut scrape = |row: status::CgroupRow| {
            let mut rows = [row];
            hold_highest(&mut rows, &mut highest);
            let [row] = rows;
            (row.cgroup, row.enforced_total)
        };
        assert_eq!(scrape(row("/pods/a".into(), 3)), ("/pods/a".into(), 3));
        // Its counters went with it; its open sockets are still listed.
        let removed = status::removed_name(7);
        assert_eq!(scrape(row(removed.clone(), 0)), ("/pods/a".into(), 3));
        assert_eq!(scrape(row(removed.clone(), 0)), ("/pods/a".into(), 3));
        // One never exported under a name has none to keep.
        let mut highest = Highest::new();
        let mut rows = [row(removed.clone(), 0)];
        hold_highest(&mut rows, &mut highest);
        assert_eq!(rows[0].cgroup, removed);
    }
}
