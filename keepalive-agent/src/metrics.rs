//! `run --metrics ADDR`: Prometheus text exposition of the pinned counters.
//!
//! A dozen lines of HTTP/1.1 serve `GET /metrics`; pulling in an HTTP stack for one endpoint
//! would cost more than it gives. Each scrape reads the maps afresh, so the numbers are the
//! kernel's own.

use std::{fmt::Write as _, io::ErrorKind, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{Mutex, Semaphore},
};

use crate::{accept::Pacer, cgroup::Cgroup2, error::Error, pin::StateDir, status};

/// The lowest port any process may listen on without CAP_NET_BIND_SERVICE, in this network
/// namespace (`net.ipv4.ip_unprivileged_port_start`, 1024 unless changed).
pub fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(1024)
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
pub fn listen(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let bound = std::net::TcpListener::bind(addr).and_then(|listener| {
        listener.set_nonblocking(true)?;
        TcpListener::from_std(listener)
    });
    bound.map_err(|err| match err.kind() {
        ErrorKind::PermissionDenied => Error::Permission(format!(
            "cannot listen for metrics on {addr}: {err}; {}",
            privileged_port_fix(addr.port())
        ))
        .into(),
        _ => anyhow::Error::new(err).context(format!("failed to listen for metrics on {addr}")),
    })
}

/// Whether process `pid` listens on TCP `port`, from its descriptors and the TCP tables of its
/// network namespace: told apart from another process holding the port.
pub fn listens_on(pid: &str, port: u16) -> bool {
    let proc = Path::new("/proc").join(pid);
    let Ok(fds) = std::fs::read_dir(proc.join("fd")) else {
        return false;
    };
    let inodes: Vec<String> = fds
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|link| {
            let link = link.to_str()?;
            Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    ["net/tcp", "net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(proc.join(table))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|line| listening_inode(line, port).is_some_and(|i| inodes.iter().any(|o| o == i)))
    })
}

/// The inode of a row of /proc/net/tcp{,6} if it is a listener on `port`: local address in
/// field 1 as `ADDR:PORT` in hex, state in field 3 (0A is LISTEN), inode in field 9.
fn listening_inode(line: &str, port: u16) -> Option<&str> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let local_port = fields.get(1)?.rsplit_once(':')?.1;
    (u16::from_str_radix(local_port, 16).ok()? == port && *fields.get(3)? == "0A")
        .then(|| fields.get(9).copied())
        .flatten()
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the exposition text.
pub fn render(state: &StateDir, cgroup2: &Cgroup2) -> anyhow::Result<String> {
    let snapshot = status::summary(state, cgroup2)?;
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
    Ok(out)
}

/// Runs `work` on the blocking pool once no earlier work of `gate` runs any more. The gate is
/// held until `work` returns, also when the request that started it gave up waiting, so
/// however many scrapes arrive, one map walk runs at a time.
async fn one_at_a_time<T: Send + 'static>(
    gate: &Arc<Mutex<()>>,
    work: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let held = Arc::clone(gate).lock_owned().await;
    let done = tokio::task::spawn_blocking(move || {
        let _held = held;
        work()
    });
    Ok(done.await?)
}

async fn respond(
    mut stream: TcpStream,
    state: &StateDir,
    cgroup2: &Cgroup2,
    gate: &Arc<Mutex<()>>,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let request_line = String::from_utf8_lossy(&head);
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let get = request_line.starts_with("GET ");
    let (status, content_type, body) =
        if get && (path == "/metrics" || path.starts_with("/metrics?")) {
            // Reading the maps takes a status walk (a few ms, hundreds at 200k sockets): off
            // the agent's loop, which also serves signals, the control socket and inotify.
            let (state, cgroup2) = (state.clone(), cgroup2.clone());
            let rendered = one_at_a_time(gate, move || render(&state, &cgroup2)).await;
            match rendered.and_then(|body| body) {
                Ok(body) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body),
                Err(err) => (
                    "503 Service Unavailable",
                    "text/plain; charset=utf-8",
                    format!("{err:#}\n"),
                ),
            }
        } else {
            (
                "404 Not Found",
                "text/plain; charset=utf-8",
                "try /metrics\n".to_owned(),
            )
        };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// How many scrape connections the agent holds at once; more wait in the listen queue. Each
/// holds a file descriptor for up to [`CLIENT_TIMEOUT`], and clients that connect and send
/// nothing must not take the descriptors the agent needs for its policy maps and cgroups.
pub const MAX_CLIENTS: usize = 8;

/// How long one scrape connection may take, from accept to the last byte of the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves scrapes until the process exits.
pub async fn serve(listener: TcpListener, state: StateDir, cgroup2: Cgroup2) {
    let gate = Arc::new(Mutex::new(()));
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let mut pacer = Pacer::new("metrics");
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (stream, _) = pacer.accept(|| listener.accept()).await;
        let state = state.clone();
        let cgroup2 = cgroup2.clone();
        let gate = Arc::clone(&gate);
        tokio::spawn(async move {
            let _slot = slot;
            let served =
                tokio::time::timeout(CLIENT_TIMEOUT, respond(stream, &state, &cgroup2, &gate))
                    .await;
            if let Ok(Err(err)) = served {
                log::debug!("metrics client: {err}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn scrapes_walk_the_maps_one_at_a_time_even_when_they_give_up_waiting() {
        let gate = Arc::new(Mutex::new(()));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let work = || {
            let (running, most) = (Arc::clone(&running), Arc::clone(&most));
            move || {
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
        let _ = one_at_a_time(&gate, || ()).await;
        assert_eq!(most.load(Ordering::SeqCst), 1);
    }
}
