//! Socket helper for the integration tests. The tests start it inside a cgroup (and network
//! namespace) of their own, so the sockets it creates belong there. It reports what the
//! kernel did as one JSON object per line and holds its sockets open until stdin closes.
//!
//! ```text
//! ka-sock pair <4|6|mapped> [--keepalive IDLE [--keepalive-interval S] [--keepalive-count N]]
//!              [--keepalive-after IDLE] [--user-timeout MS]
//!              [--user-timeout-after MS] [--loosen-at-report N]
//!              [--disconnect-at-report N] [--reconnect-at-report N]
//!              [--half-close-at-report N] [--keepalive-off-at-report N]
//!                                                client+server over loopback; both ends' options
//! ka-sock listen <ADDR:PORT> [N] [--keepalive IDLE] [--keepalive-after IDLE]
//!                [--user-timeout-after MS] [--keepalive-off-after]
//!                                                accept N connections (default 1), report each
//! ka-sock connect <ADDR:PORT> [--keepalive IDLE [--keepalive-interval S] [--keepalive-count N]]
//!                             [--send] [--read] [--loosen] [--loosen-large] [--self]
//!                                                connect to ADDR (with --self: bind to it and
//!                                                connect to the address bound, a simultaneous
//!                                                open with itself)
//! ka-sock storm <N>                              N loopback connect/accept/close cycles, timed;
//!                                                with KA_STORM_KEEPALIVE set (to any value),
//!                                                the application turns SO_KEEPALIVE on itself
//!                                                (listener, and each client after connecting)
//! ka-sock storms                                 the same in batches: each line N on stdin
//!                                                runs N cycles and reports their rate
//! ka-sock churn                                  connect/accept/close until stdin closes,
//!                                                counting connections without SO_KEEPALIVE
//! ka-sock hold <N> [--over-ms T]                 open N loopback connections, hold them;
//!                                                with --over-ms, spread the opening over
//!                                                T ms (a host that keeps connecting)
//! ka-sock userns-watch <DIR> <OWNER-UID> <KUID> watch every directory in DIR from a user
//!                                                namespace owned by OWNER-UID, as root there
//!                                                mapped to KUID (a container's processes)
//! ka-sock empty-sockops <CGROUP-DIR> [N]         attach a sock_ops program that does nothing,
//!                                                until stdin closes (the benchmark's floor);
//!                                                N links of it (64 fill the cgroup's list)
//! ka-sock minimal-sockops <CGROUP-DIR>           the same with the least enforcer that sets
//!                                                every socket: fixed keepalive values at
//!                                                ESTABLISHED, on both ends
//! ka-sock floor-sockops <CGROUP-DIR>             the least possible enforcer: fixed values
//!                                                on the connecting end at ESTABLISHED and
//!                                                on listeners, which accepted ends inherit
//! ka-sock foreign-sockops <CGROUP-DIR>           another tool's enforcer: idle 1 s, interval
//!                                                1 s, count 2, and state-change callbacks
//! ka-sock state-sockops <CGROUP-DIR>             a tool that watches state changes: asks for
//!                                                state-change callbacks at ESTABLISHED and
//!                                                sets TCP_KEEPIDLE to 4242 at each later
//!                                                change, a mark they came
//! ka-sock rtt-sockops <CGROUP-DIR>               an RTT monitor that replaces the callback
//!                                                flags with its own at ESTABLISHED
//! ka-sock unix-answer [--handed-on] <PATH> <LINE>
//!                                                listen on Unix socket PATH, answer the first
//!                                                client's first line with LINE, then report
//!                                                what it sent (a stand-in for an agent); with
//!                                                --handed-on, a child serves and the process
//!                                                that listened exits
//! ka-sock peak-rss <OUT-FILE> <CMD> [ARG...]     run CMD with stdout to OUT-FILE and report
//!                                                its exit code and peak resident set; from
//!                                                this small process, as a child's peak also
//!                                                counts its parent's at the spawn (vfork)
//! ```
//!
//! While holding sockets, every line on stdin asks for a fresh `{"report": [...]}` of their
//! options.
//!
//! `--keepalive IDLE` enables SO_KEEPALIVE with TCP_KEEPIDLE=IDLE before connecting or
//! listening (an application that manages keepalive itself), with TCP_KEEPINTVL and
//! TCP_KEEPCNT too on a client when `--keepalive-interval` and `--keepalive-count` give them;
//! `--user-timeout MS` sets the client's TCP_USER_TIMEOUT before connecting;
//! `--keepalive-after IDLE` does so
//! on the client once connected, as Go's net package does (with `listen`: on the listener once
//! listening, as nginx does); `--user-timeout-after MS` sets the
//! client's TCP_USER_TIMEOUT once connected (with `listen`: the listener's once listening);
//! `--keepalive-off-after` (with `listen`) switches the listener's SO_KEEPALIVE off once
//! listening, and each `accepted` line also shows the listener's options; `--loosen-at-report N` makes the client try what
//! `--loosen` does (below) just before the N-th report; `--disconnect-at-report N` disconnects
//! it (connect to AF_UNSPEC) and `--reconnect-at-report N` connects it to the listener again,
//! in that order when they name the same report, both before a loosen.
//! `--half-close-at-report N` (before the others) shuts the client's sending side down and has
//! the server read the end: the server's end is then in CLOSE_WAIT, the client's in FIN_WAIT2.
//! `--keepalive-off-at-report N` (after the others) switches the client's SO_KEEPALIVE off
//! just before the N-th report, as an application may once connected. `--send` waits until stdin closes, then
//! sends one byte. `--read` blocks in read() after connecting (and sending) and reports how it
//! ended. `--loosen` tries to switch keepalive off and raise its
//! values after connecting, then reports what getsockopt shows, then sets TCP_KEEPIDLE to 1,
//! then tries values the kernel refuses, reporting after each, then sets TCP_CONGESTION from a
//! buffer larger than a page. `--loosen-large` tries to switch keepalive off and raise
//! TCP_KEEPIDLE to 9999 with the value at the start of an 8192-byte buffer (the kernel reads
//! only its first int), then reports what getsockopt shows.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::Instant,
};

use serde_json::{Value, json};

const SOL_SOCKET: i32 = libc::SOL_SOCKET;
const SO_KEEPALIVE: i32 = libc::SO_KEEPALIVE;
const TCP: i32 = libc::IPPROTO_TCP;

fn get(fd: i32, level: i32, name: i32) -> i32 {
    let mut value: i32 = -1;
    let mut len = size_of::<i32>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`.
    let ret = unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &mut len) };
    if ret == 0 { value } else { -1 }
}

fn set(fd: i32, level: i32, name: i32, value: i32) -> i32 {
    // SAFETY: setsockopt reads 4 bytes from `value`.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<i32>() as u32,
        )
    };
    if ret == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// [`set`] with the value at the start of a zeroed 8192-byte buffer: larger than a page, of
/// which a setsockopt program sees only the first.
fn set_large(fd: i32, level: i32, name: i32, value: i32) -> i32 {
    let mut buf = vec![0u8; 8192];
    buf[..4].copy_from_slice(&value.to_ne_bytes());
    // SAFETY: setsockopt reads `buf.len()` bytes from the buffer.
    let ret = unsafe { libc::setsockopt(fd, level, name, buf.as_ptr().cast(), buf.len() as u32) };
    if ret == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// Makes close() send a reset instead of a FIN, so tens of thousands of cycles leave no
/// TIME_WAIT sockets behind.
fn reset_on_close(fd: i32) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads a linger struct.
    unsafe {
        libc::setsockopt(
            fd,
            SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as u32,
        )
    };
}

fn options(fd: i32) -> Value {
    json!({
        "keepalive": get(fd, SOL_SOCKET, SO_KEEPALIVE),
        "idle": get(fd, TCP, libc::TCP_KEEPIDLE),
        "interval": get(fd, TCP, libc::TCP_KEEPINTVL),
        "count": get(fd, TCP, libc::TCP_KEEPCNT),
        "user_timeout": get(fd, TCP, libc::TCP_USER_TIMEOUT),
    })
}

fn emit(value: Value) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}").expect("stdout");
    out.flush().expect("stdout");
}

/// Holds the sockets until stdin closes. Each line read from stdin asks for a fresh report of
/// their options, printed as `{"report": [...]}` in the order they were opened.
fn hold(fds: &[i32]) {
    hold_and(fds, |_| {});
}

/// [`hold`], calling `before_report` with the number of each report (from 1) before it is
/// made: an application that changes its sockets at a time the test chooses.
fn hold_and(fds: &[i32], mut before_report: impl FnMut(usize)) {
    let mut line = String::new();
    let mut reports = 0;
    while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
        reports += 1;
        before_report(reports);
        let report: Vec<Value> = fds.iter().map(|&fd| options(fd)).collect();
        emit(json!({ "report": report }));
        line.clear();
    }
}

/// A new TCP socket of `addr`'s family.
fn tcp_socket(addr: SocketAddr) -> i32 {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    fd
}

/// A socket of the right family connected to `addr`, with what `args` sets before connecting:
/// keepalive (`--keepalive IDLE`, `--keepalive-interval S`, `--keepalive-count N`) and
/// TCP_USER_TIMEOUT (`--user-timeout MS`). With `--self`, the socket binds to `addr` and
/// connects to the address it got: a simultaneous open with itself.
fn connect(addr: SocketAddr, args: &[String]) -> TcpStream {
    let fd = tcp_socket(addr);
    if let Some(idle) = flag_value(args, "--keepalive") {
        assert_eq!(set(fd, SOL_SOCKET, SO_KEEPALIVE, 1), 0);
        let values = [
            (libc::TCP_KEEPIDLE, Some(idle)),
            (
                libc::TCP_KEEPINTVL,
                flag_value(args, "--keepalive-interval"),
            ),
            (libc::TCP_KEEPCNT, flag_value(args, "--keepalive-count")),
        ];
        for (name, value) in values {
            if let Some(value) = value {
                assert_eq!(set(fd, TCP, name, value), 0);
            }
        }
    }
    if let Some(ms) = flag_value(args, "--user-timeout") {
        assert_eq!(set(fd, TCP, libc::TCP_USER_TIMEOUT, ms), 0);
    }
    // SAFETY: `fd` is a fresh socket we own.
    let stream = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let addr = if args.iter().any(|a| a == "--self") {
        bind(fd, addr);
        stream.local_addr().expect("local addr")
    } else {
        addr
    };
    connect_to(fd, Some(addr));
    stream
}

/// bind(2) of `fd` to `addr`; panics on failure.
fn bind(fd: i32, addr: SocketAddr) {
    let (storage, len) = sockaddr(addr);
    // SAFETY: `storage` holds a valid sockaddr of `len` bytes.
    let ret = unsafe { libc::bind(fd, (&raw const storage).cast(), len) };
    assert_eq!(ret, 0, "bind {addr}: {}", std::io::Error::last_os_error());
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            (storage, size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            (storage, size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

/// A listener on `addr`; with `keepalive`, SO_KEEPALIVE and TCP_KEEPIDLE are set before
/// listen(), as an application that wants keepalive on every accepted connection does.
fn listener(addr: SocketAddr, keepalive: Option<i32>) -> TcpListener {
    let Some(idle) = keepalive else {
        return TcpListener::bind(addr).expect("bind");
    };
    let fd = tcp_socket(addr);
    // SAFETY: `fd` is a fresh socket we own.
    let listener = unsafe { <TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    assert_eq!(set(fd, SOL_SOCKET, SO_KEEPALIVE, 1), 0);
    assert_eq!(set(fd, TCP, libc::TCP_KEEPIDLE, idle), 0);
    bind(fd, addr);
    // SAFETY: listen(2) on our socket.
    assert_eq!(unsafe { libc::listen(fd, 128) }, 0, "listen");
    listener
}

fn flag_value(args: &[String], flag: &str) -> Option<i32> {
    let at = args.iter().position(|a| a == flag)?;
    Some(args.get(at + 1)?.parse().expect("numeric flag value"))
}

fn pair(args: &[String]) {
    let (bind, family): (SocketAddr, _) = match args.first().map(String::as_str) {
        Some("4") => ("127.0.0.1:0".parse().expect("addr"), "4"),
        Some("6") => ("[::1]:0".parse().expect("addr"), "6"),
        Some("mapped") => ("[::]:0".parse().expect("addr"), "mapped"),
        other => panic!("pair needs 4, 6 or mapped, not {other:?}"),
    };
    let listener = TcpListener::bind(bind).expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    let target: SocketAddr = match family {
        "4" => format!("127.0.0.1:{port}"),
        "6" => format!("[::1]:{port}"),
        _ => format!("[::ffff:127.0.0.1]:{port}"),
    }
    .parse()
    .expect("addr");
    let client = connect(target, args);
    let (server, _) = listener.accept().expect("accept");
    if let Some(idle) = flag_value(args, "--keepalive-after") {
        let fd = client.as_raw_fd();
        assert_eq!(set(fd, SOL_SOCKET, SO_KEEPALIVE, 1), 0);
        assert_eq!(set(fd, TCP, libc::TCP_KEEPIDLE, idle), 0);
    }
    if let Some(ms) = flag_value(args, "--user-timeout-after") {
        assert_eq!(set(client.as_raw_fd(), TCP, libc::TCP_USER_TIMEOUT, ms), 0);
    }
    emit(json!({
        "client": options(client.as_raw_fd()),
        "server": options(server.as_raw_fd()),
        "client_local": client.local_addr().expect("addr").to_string(),
        "server_local": server.local_addr().expect("addr").to_string(),
    }));
    let at = |flag| flag_value(args, flag).map(|n| n as usize);
    let (loosen_at, disconnect_at, reconnect_at) = (
        at("--loosen-at-report"),
        at("--disconnect-at-report"),
        at("--reconnect-at-report"),
    );
    let half_close_at = at("--half-close-at-report");
    let keepalive_off_at = at("--keepalive-off-at-report");
    let fd = client.as_raw_fd();
    hold_and(&[fd, server.as_raw_fd()], |report| {
        if Some(report) == half_close_at {
            client
                .shutdown(std::net::Shutdown::Write)
                .expect("shutdown");
            // The server end is in CLOSE_WAIT once it reads the end.
            let read = (&server).read(&mut [0u8; 1]).expect("read");
            assert_eq!(read, 0, "the client sent nothing before its end");
        }
        if Some(report) == disconnect_at {
            connect_to(fd, None);
        }
        if Some(report) == reconnect_at {
            connect_to(fd, Some(target));
        }
        if Some(report) == loosen_at {
            loosen(fd);
        }
        if Some(report) == keepalive_off_at {
            assert_eq!(set(fd, SOL_SOCKET, SO_KEEPALIVE, 0), 0);
        }
    });
}

/// connect(2) of `fd` to `addr`, or with `None` to AF_UNSPEC, which disconnects a connected
/// TCP socket (it can then connect again); panics on failure.
fn connect_to(fd: i32, addr: Option<SocketAddr>) {
    let (storage, len) = match addr {
        Some(addr) => sockaddr(addr),
        None => {
            // SAFETY: an all-zero sockaddr_storage is valid; its family is AF_UNSPEC (0).
            let storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            (storage, size_of::<libc::sockaddr>() as u32)
        }
    };
    // SAFETY: `storage` holds a valid sockaddr of `len` bytes.
    let ret = unsafe { libc::connect(fd, (&raw const storage).cast(), len) };
    assert_eq!(
        ret,
        0,
        "connect to {addr:?}: {}",
        std::io::Error::last_os_error()
    );
}

/// Tries to switch keepalive off and loosen its values, as an application may after the
/// policy was applied; the result of each call (0 or an errno).
fn loosen(fd: i32) -> Value {
    json!({
        "so_keepalive_0": set(fd, SOL_SOCKET, SO_KEEPALIVE, 0),
        "idle_9999": set(fd, TCP, libc::TCP_KEEPIDLE, 9999),
        "interval_999": set(fd, TCP, libc::TCP_KEEPINTVL, 999),
        "count_100": set(fd, TCP, libc::TCP_KEEPCNT, 100),
        "user_timeout_0": set(fd, TCP, libc::TCP_USER_TIMEOUT, 0),
    })
}

/// Tries values the kernel refuses; the result of each call (0 or an errno).
fn invalid(fd: i32) -> Value {
    json!({
        "idle_0": set(fd, TCP, libc::TCP_KEEPIDLE, 0),
        "idle_32768": set(fd, TCP, libc::TCP_KEEPIDLE, 32_768),
        "interval_0": set(fd, TCP, libc::TCP_KEEPINTVL, 0),
        "count_0": set(fd, TCP, libc::TCP_KEEPCNT, 0),
        "count_128": set(fd, TCP, libc::TCP_KEEPCNT, 128),
        "user_timeout_-1": set(fd, TCP, libc::TCP_USER_TIMEOUT, -1),
    })
}

fn listen(args: &[String]) {
    let addr: SocketAddr = args
        .first()
        .expect("listen ADDR:PORT")
        .parse()
        .expect("addr");
    let n: usize = args.get(1).map_or(1, |n| n.parse().expect("count"));
    let listener = listener(addr, flag_value(args, "--keepalive"));
    if let Some(idle) = flag_value(args, "--keepalive-after") {
        let fd = listener.as_raw_fd();
        assert_eq!(set(fd, SOL_SOCKET, SO_KEEPALIVE, 1), 0);
        assert_eq!(set(fd, TCP, libc::TCP_KEEPIDLE, idle), 0);
    }
    if let Some(ms) = flag_value(args, "--user-timeout-after") {
        assert_eq!(
            set(listener.as_raw_fd(), TCP, libc::TCP_USER_TIMEOUT, ms),
            0
        );
    }
    if args.iter().any(|a| a == "--keepalive-off-after") {
        assert_eq!(set(listener.as_raw_fd(), SOL_SOCKET, SO_KEEPALIVE, 0), 0);
    }
    emit(json!({ "port": listener.local_addr().expect("addr").port() }));
    let mut accepted = Vec::new();
    for _ in 0..n {
        let (stream, peer) = listener.accept().expect("accept");
        emit(json!({
            "accepted": options(stream.as_raw_fd()),
            "peer": peer.to_string(),
            "listener": options(listener.as_raw_fd()),
        }));
        accepted.push(stream);
    }
    let fds: Vec<i32> = accepted.iter().map(|s| s.as_raw_fd()).collect();
    hold(&fds);
}

fn connect_cmd(args: &[String]) {
    let addr: SocketAddr = args
        .first()
        .expect("connect ADDR:PORT")
        .parse()
        .expect("addr");
    let mut stream = connect(addr, args);
    let fd = stream.as_raw_fd();
    emit(json!({
        "connected": options(fd),
        "local": stream.local_addr().expect("addr").to_string(),
    }));
    if args.iter().any(|a| a == "--loosen") {
        emit(json!({ "loosen": loosen(fd), "after": options(fd) }));
        let tighter = json!({ "idle_1": set(fd, TCP, libc::TCP_KEEPIDLE, 1) });
        emit(json!({ "tighten": tighter, "after": options(fd) }));
        emit(json!({ "invalid": invalid(fd), "after": options(fd) }));
        // An option value larger than a page, which a setsockopt program sees only in part.
        let mut reno = vec![0u8; 5000];
        reno[..4].copy_from_slice(b"reno");
        // SAFETY: setsockopt reads `reno.len()` bytes from the buffer.
        let ret = unsafe {
            libc::setsockopt(
                fd,
                TCP,
                libc::TCP_CONGESTION,
                reno.as_ptr().cast(),
                reno.len() as u32,
            )
        };
        let mut name = [0u8; 16];
        let mut len = name.len() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `name`.
        unsafe {
            libc::getsockopt(
                fd,
                TCP,
                libc::TCP_CONGESTION,
                name.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let name = String::from_utf8_lossy(&name)
            .trim_end_matches('\0')
            .to_owned();
        emit(json!({ "large_value": ret, "congestion": name }));
    }
    if args.iter().any(|a| a == "--loosen-large") {
        let results = json!({
            "so_keepalive_0": set_large(fd, SOL_SOCKET, SO_KEEPALIVE, 0),
            "idle_9999": set_large(fd, TCP, libc::TCP_KEEPIDLE, 9999),
        });
        emit(json!({ "loosen_large": results, "after": options(fd) }));
    }
    if args.iter().any(|a| a == "--send") {
        // Data in flight, so a retransmission timer runs (and TCP_USER_TIMEOUT with it).
        std::io::stdin()
            .read_to_end(&mut Vec::new())
            .expect("read stdin");
        stream.write_all(b"x").expect("send");
    }
    if args.iter().any(|a| a == "--read") {
        let start = Instant::now();
        let mut buf = [0u8; 64];
        let outcome = match stream.read(&mut buf) {
            Ok(0) => json!({ "read": "eof" }),
            Ok(n) => json!({ "read": "data", "bytes": n }),
            Err(err) => {
                json!({ "read": "error", "errno": err.raw_os_error(), "error": err.to_string() })
            }
        };
        let mut outcome = outcome;
        outcome["elapsed_ms"] = json!(start.elapsed().as_millis() as u64);
        emit(outcome);
        return;
    }
    hold(&[fd]);
}

/// The listener of `storm` and `storms`.
struct Storm {
    listener: TcpListener,
    addr: std::net::SocketAddr,
    app_keepalive: bool,
}

impl Storm {
    fn new() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app_keepalive = std::env::var_os("KA_STORM_KEEPALIVE").is_some();
        if app_keepalive {
            set(listener.as_raw_fd(), SOL_SOCKET, SO_KEEPALIVE, 1);
        }
        Self {
            listener,
            addr,
            app_keepalive,
        }
    }

    /// `n` cycles, timed. Lock-step connect/accept/close in one thread: no accept backlog can
    /// overflow, so no SYN is ever retransmitted and the timing measures the per-connection
    /// work itself.
    fn run(&self, n: usize) -> std::time::Duration {
        let start = Instant::now();
        for _ in 0..n {
            let client = TcpStream::connect(self.addr).expect("connect");
            let (server, _) = self.listener.accept().expect("accept");
            reset_on_close(client.as_raw_fd());
            if self.app_keepalive {
                set(client.as_raw_fd(), SOL_SOCKET, SO_KEEPALIVE, 1);
            }
            drop(client);
            drop(server);
        }
        start.elapsed()
    }
}

fn storm(args: &[String]) {
    let n: usize = args.first().expect("storm N").parse().expect("count");
    let elapsed = Storm::new().run(n);
    emit(json!({
        "connections": n,
        "elapsed_us": elapsed.as_micros() as u64,
        "per_second": n as f64 / elapsed.as_secs_f64(),
    }));
}

/// `storm` in batches on demand: one per line of stdin, which gives its number of cycles.
fn storms() {
    let storm = Storm::new();
    emit(json!({ "ready": true }));
    for line in std::io::stdin().lines() {
        let line = line.expect("read stdin");
        let n: usize = line.trim().parse().expect("a number of cycles");
        let elapsed = storm.run(n);
        emit(json!({
            "connections": n,
            "per_second": n as f64 / elapsed.as_secs_f64(),
        }));
    }
}

/// Opens `n` loopback connections (spread over enough listeners that ephemeral ports never run
/// out), reports how long that took, and holds them until stdin closes.
fn hold_many(args: &[String]) {
    let n: usize = args.first().expect("hold N").parse().expect("count");
    let needed = (2 * n + 64) as libc::rlim_t;
    // SAFETY: an all-zero rlimit is valid; getrlimit fills it.
    let mut rlim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit/setrlimit read and write the struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rlim) };
    if rlim.rlim_cur < needed {
        rlim.rlim_cur = needed;
        rlim.rlim_max = rlim.rlim_max.max(needed);
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) } != 0 {
            panic!(
                "raise RLIMIT_NOFILE to {needed}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let listeners: Vec<TcpListener> = (0..n.div_ceil(20_000).max(1))
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let over = std::time::Duration::from_millis(flag_value(args, "--over-ms").unwrap_or(0) as u64);
    let start = Instant::now();
    let mut held = Vec::with_capacity(2 * n);
    for i in 0..n {
        let due = over.mul_f64(i as f64 / n as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let listener = &listeners[i % listeners.len()];
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        held.push(client);
        held.push(server);
    }
    emit(json!({ "connections": n, "elapsed_us": start.elapsed().as_micros() as u64 }));
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    for stream in &held {
        reset_on_close(stream.as_raw_fd());
    }
}

/// Opens and closes loopback connections until stdin closes, checking on every one that both
/// ends carry SO_KEEPALIVE; reports how many did not.
fn churn() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut rest);
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    emit(json!({ "started": true }));
    let (mut total, mut bare) = (0u64, 0u64);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let client = TcpStream::connect(addr).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        total += 1;
        if get(client.as_raw_fd(), SOL_SOCKET, SO_KEEPALIVE) != 1
            || get(server.as_raw_fd(), SOL_SOCKET, SO_KEEPALIVE) != 1
        {
            bare += 1;
        }
        reset_on_close(client.as_raw_fd());
    }
    emit(json!({ "connections": total, "without_keepalive": bare }));
}

/// One BPF instruction: opcode, destination and source registers, offset, immediate.
const fn insn(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    op as u64
        | ((dst | src << 4) as u64) << 8
        | (off as u16 as u64) << 16
        | (imm as u32 as u64) << 32
}

/// `mov64 r0, 1; exit`: lets every operation proceed and does nothing else.
const RETURN_1: [u64; 2] = [insn(0xb7, 0, 0, 0, 1), insn(0x95, 0, 0, 0, 0)];

/// sock_ops operations (`enum bpf_sock_ops_op`) the reference enforcers act on.
const ACTIVE_ESTABLISHED_CB: i32 = 4;
const PASSIVE_ESTABLISHED_CB: i32 = 5;
const TCP_LISTEN_CB: i32 = 11;

/// The least a sock_ops keepalive enforcer does that sets every socket itself: at
/// ACTIVE_ESTABLISHED and PASSIVE_ESTABLISHED, bpf_setsockopt TCP_KEEPIDLE 60, TCP_KEEPINTVL
/// 10, TCP_KEEPCNT 5 and SO_KEEPALIVE 1 (the benchmark's default policy), with no policy
/// lookup and no tracking.
fn minimal_enforcer() -> Vec<u64> {
    enforcer([60, 10, 5], false)
}

/// The least any sock_ops keepalive enforcer can do: [`minimal_enforcer`]'s values on the
/// connecting end at ACTIVE_ESTABLISHED and on each listener at TCP_LISTEN_CB, whose accepted
/// connections inherit them from the kernel's socket clone at no cost of their own (as
/// keepalive-agent's listeners do).
fn floor_enforcer() -> Vec<u64> {
    enforcer_at([ACTIVE_ESTABLISHED_CB, TCP_LISTEN_CB], [60, 10, 5], false)
}

/// Another tool's enforcer, as [`minimal_enforcer`] with idle, interval and count `values`,
/// which also asks for the socket's state-change callbacks when `state_cb`; every sock_ops
/// program on the socket's cgroups then gets them.
fn enforcer(values: [i32; 3], state_cb: bool) -> Vec<u64> {
    enforcer_at(
        [ACTIVE_ESTABLISHED_CB, PASSIVE_ESTABLISHED_CB],
        values,
        state_cb,
    )
}

/// [`enforcer`] acting on the two operations `ops` instead of the two ESTABLISHED ones.
fn enforcer_at(ops: [i32; 2], values: [i32; 3], state_cb: bool) -> Vec<u64> {
    const SETSOCKOPT: i32 = 49;
    const CB_FLAGS_SET: i32 = 59;
    const STATE_CB_FLAG: i32 = 4;
    // Each setsockopt call is 8 instructions, the callback request 3.
    let body = (4 * 8 + if state_cb { 3 } else { 0 }) as i16;
    let mut prog = vec![
        insn(0xbf, 6, 1, 0, 0),      // r6 = ctx
        insn(0x61, 2, 1, 0, 0),      // r2 = ctx->op
        insn(0x15, 2, 0, 2, ops[0]), // the first operation: set
        insn(0x15, 2, 0, 1, ops[1]), // the second: set
        insn(0x05, 0, 0, body, 0),   // else: return
    ];
    let [idle, interval, count] = values;
    for (level, name, value) in [
        (TCP, libc::TCP_KEEPIDLE, idle),
        (TCP, libc::TCP_KEEPINTVL, interval),
        (TCP, libc::TCP_KEEPCNT, count),
        (SOL_SOCKET, SO_KEEPALIVE, 1),
    ] {
        prog.extend([
            insn(0x62, 10, 0, -4, value), // *(u32 *)(r10 - 4) = value
            insn(0xbf, 1, 6, 0, 0),       // r1 = ctx
            insn(0xb7, 2, 0, 0, level),
            insn(0xb7, 3, 0, 0, name),
            insn(0xbf, 4, 10, 0, 0), // r4 = &value
            insn(0x07, 4, 0, 0, -4),
            insn(0xb7, 5, 0, 0, 4), // optlen
            insn(0x85, 0, 0, 0, SETSOCKOPT),
        ]);
    }
    if state_cb {
        prog.extend([
            insn(0xbf, 1, 6, 0, 0), // r1 = ctx
            insn(0xb7, 2, 0, 0, STATE_CB_FLAG),
            insn(0x85, 0, 0, 0, CB_FLAGS_SET),
        ]);
    }
    prog.extend(RETURN_1);
    prog
}

/// An RTT monitor as some are written: at ACTIVE_ESTABLISHED and PASSIVE_ESTABLISHED it sets
/// the socket's callback flags to BPF_SOCK_OPS_RTT_CB_FLAG alone, replacing any that programs
/// before it asked for, rather than adding its own to them.
const RTT_MONITOR: [u64; 8] = [
    insn(0x61, 2, 1, 0, 0),  // r2 = ctx->op
    insn(0x15, 2, 0, 2, 4),  // ACTIVE_ESTABLISHED_CB: set
    insn(0x15, 2, 0, 1, 5),  // PASSIVE_ESTABLISHED_CB: set
    insn(0x05, 0, 0, 2, 0),  // else: return
    insn(0xb7, 2, 0, 0, 8),  // r2 = BPF_SOCK_OPS_RTT_CB_FLAG (r1 is still ctx)
    insn(0x85, 0, 0, 0, 59), // bpf_sock_ops_cb_flags_set
    RETURN_1[0],
    RETURN_1[1],
];

/// A tool that follows sockets' states: at ACTIVE_ESTABLISHED and PASSIVE_ESTABLISHED it asks
/// for state-change callbacks, and at each state change after ESTABLISHED it sets TCP_KEEPIDLE
/// to 4242, a mark in the socket that the callbacks still come.
const STATE_WATCHER: [u64; 22] = [
    insn(0xbf, 6, 1, 0, 0),      // 0: r6 = ctx
    insn(0x61, 2, 1, 0, 0),      // 1: r2 = ctx->op
    insn(0x15, 2, 0, 3, 4),      // 2: ACTIVE_ESTABLISHED_CB: to 6
    insn(0x15, 2, 0, 2, 5),      // 3: PASSIVE_ESTABLISHED_CB: to 6
    insn(0x15, 2, 0, 5, 10),     // 4: STATE_CB: to 10
    insn(0x05, 0, 0, 14, 0),     // 5: else: return
    insn(0xbf, 1, 6, 0, 0),      // 6: r1 = ctx
    insn(0xb7, 2, 0, 0, 4),      // 7: r2 = BPF_SOCK_OPS_STATE_CB_FLAG
    insn(0x85, 0, 0, 0, 59),     // 8: bpf_sock_ops_cb_flags_set
    insn(0x05, 0, 0, 10, 0),     // 9: return
    insn(0x61, 2, 6, 8, 0),      // 10: r2 = ctx->args[1], the new state
    insn(0x15, 2, 0, 8, 1),      // 11: TCP_ESTABLISHED: return
    insn(0x62, 10, 0, -4, 4242), // 12: *(u32 *)(r10 - 4) = 4242
    insn(0xbf, 1, 6, 0, 0),      // 13: r1 = ctx
    insn(0xb7, 2, 0, 0, TCP),    // 14: level
    insn(0xb7, 3, 0, 0, libc::TCP_KEEPIDLE),
    insn(0xbf, 4, 10, 0, 0), // 16: r4 = &value
    insn(0x07, 4, 0, 0, -4),
    insn(0xb7, 5, 0, 0, 4),  // 18: optlen
    insn(0x85, 0, 0, 0, 49), // 19: bpf_setsockopt
    RETURN_1[0],             // 20
    RETURN_1[1],
];

/// Loads `insns` as a sock_ops program and attaches it to a cgroup through a BPF link, so the
/// attachment ends with this process; holds it until stdin closes. The benchmark uses these to
/// measure what the kernel charges for calling any sock_ops program on each connection, and
/// what the least possible enforcer costs, apart from what ours does.
fn attach_sockops(dir: &str, insns: &[u64], links: usize) {
    let cgroup = std::fs::File::open(dir).expect("open cgroup");
    let license = c"GPL";
    // union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, then zeroes.
    let mut attr = [0u64; 16];
    attr[0] = 13 | ((insns.len() as u64) << 32); // BPF_PROG_TYPE_SOCK_OPS
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    // SAFETY: bpf(2) reads `attr` (128 bytes, zero past the fields set) and the buffers it
    // points to, which outlive the call.
    let prog = unsafe { libc::syscall(libc::SYS_bpf, 5, attr.as_ptr(), size_of_val(&attr)) };
    assert!(
        prog >= 0,
        "BPF_PROG_LOAD: {}",
        std::io::Error::last_os_error()
    );
    for _ in 0..links {
        // BPF_LINK_CREATE: prog_fd, target_fd, attach_type BPF_CGROUP_SOCK_OPS, flags 0.
        let mut attr = [0u64; 16];
        attr[0] = prog as u64 | ((cgroup.as_raw_fd() as u64) << 32);
        attr[1] = 3;
        // SAFETY: as above.
        let link = unsafe { libc::syscall(libc::SYS_bpf, 28, attr.as_ptr(), size_of_val(&attr)) };
        assert!(
            link >= 0,
            "BPF_LINK_CREATE: {}",
            std::io::Error::last_os_error()
        );
    }
    emit(json!({ "attached": true }));
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
}

/// Listens on the Unix socket `args[0]`, reports `{"listening": true}`, answers the first
/// client's first line with `args[1]`, and reports `{"received": LINE}` (empty when the client
/// sent nothing before closing). After `--handed-on`, a child does all but the listen and
/// this process exits: the credentials a client gets (SO_PEERCRED) are still this one's.
fn unix_answer(args: &[String]) {
    use std::io::BufRead as _;
    let (handed_on, args) = match args {
        [flag, rest @ ..] if flag == "--handed-on" => (true, rest),
        _ => (false, args),
    };
    let [path, answer] = args else {
        panic!("usage: ka-sock unix-answer [--handed-on] <PATH> <LINE>");
    };
    let listener = std::os::unix::net::UnixListener::bind(path).expect("bind the socket");
    if handed_on {
        // SAFETY: this process has one thread, which the child carries on.
        match unsafe { libc::fork() } {
            -1 => panic!("fork: {}", std::io::Error::last_os_error()),
            0 => {}
            _ => std::process::exit(0),
        }
    }
    emit(json!({ "listening": true }));
    let (stream, _) = listener.accept().expect("accept");
    let mut line = String::new();
    let _ = std::io::BufReader::new(&stream).read_line(&mut line);
    let _ = (&stream).write_all(format!("{answer}\n").as_bytes());
    emit(json!({ "received": line.trim_end() }));
}

/// Runs `args[1..]` with stdout to the file `args[0]`, and reports `{"code", "maxrss_kib"}`.
/// The kernel gives a process the peak of the memory it ran in before exec, which for a
/// command spawned with vfork (as std spawns) is the parent's: this process's few MiB, not
/// a test binary's.
fn peak_rss(args: &[String]) {
    let [out, cmd, rest @ ..] = args else {
        panic!("usage: ka-sock peak-rss <OUT-FILE> <CMD> [ARG...]");
    };
    #[expect(
        clippy::zombie_processes,
        reason = "reaped with wait4 below, which gives its resource usage"
    )]
    let child = std::process::Command::new(cmd)
        .args(rest)
        .stdout(std::fs::File::create(out).expect("create the output file"))
        .spawn()
        .expect("spawn the command");
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    let mut wstatus = 0;
    // SAFETY: a zeroed rusage is valid; wait4 fills it for this child, which std never waits
    // for.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers; `pid` is this process's child.
    let waited = unsafe { libc::wait4(pid, &raw mut wstatus, 0, &raw mut usage) };
    assert_eq!(waited, pid, "wait4: {}", std::io::Error::last_os_error());
    let code = if libc::WIFEXITED(wstatus) {
        libc::WEXITSTATUS(wstatus)
    } else {
        -1
    };
    println!("{}", json!({"code": code, "maxrss_kib": usage.ru_maxrss}));
}

/// `userns-watch <DIR> <OWNER-UID> <KUID>`: a process in a user namespace of its own, owned
/// by OWNER-UID, running there as root mapped to KUID outside, watches every directory in DIR
/// with inotify, as a container's processes do. Reports its pid and watches, and holds them
/// until stdin closes.
fn userns_watch(args: &[String]) {
    let [dir, owner, kuid] = args else {
        panic!("usage: ka-sock userns-watch <DIR> <OWNER-UID> <KUID>");
    };
    let owner: libc::uid_t = owner.parse().expect("owner uid");
    let paths: Vec<std::ffi::CString> = std::fs::read_dir(dir)
        .expect("the directory to watch in")
        .map(|entry| {
            let path = entry.expect("an entry").path();
            std::ffi::CString::new(path.into_os_string().into_encoded_bytes()).expect("no NUL")
        })
        .collect();
    let (mut ready, mut mapped) = ([0; 2], [0; 2]);
    // SAFETY: pipe fills the two descriptors.
    if unsafe { libc::pipe(ready.as_mut_ptr()) != 0 || libc::pipe(mapped.as_mut_ptr()) != 0 } {
        panic!("pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: this process has one thread; the child makes system calls only, then _exit.
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork: {}", std::io::Error::last_os_error());
    if child == 0 {
        // SAFETY: system calls on values prepared before fork; no allocation.
        unsafe {
            let step = |ok: bool, code: i32| {
                if !ok {
                    libc::_exit(code);
                }
            };
            // The parent's ends: a parent gone ends the reads below.
            libc::close(ready[0]);
            libc::close(mapped[1]);
            step(libc::setgroups(0, std::ptr::null()) == 0, 9);
            step(libc::setresgid(owner, owner, owner) == 0, 10);
            step(libc::setresuid(owner, owner, owner) == 0, 11);
            step(libc::unshare(libc::CLONE_NEWUSER) == 0, 12);
            let byte = [1u8];
            step(libc::write(ready[1], byte.as_ptr().cast(), 1) == 1, 13);
            let mut got = [0u8];
            step(libc::read(mapped[0], got.as_mut_ptr().cast(), 1) == 1, 14);
            step(libc::setresuid(0, 0, 0) == 0, 15);
            // After the last change of credentials, which clears it.
            step(
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) == 0,
                16,
            );
            // Gone before that: nothing would end this process.
            step(libc::getppid() == parent, 20);
            let fd = libc::inotify_init();
            step(fd >= 0, 17);
            for path in &paths {
                step(
                    libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_ATTRIB) >= 0,
                    18,
                );
            }
            step(libc::write(ready[1], byte.as_ptr().cast(), 1) == 1, 19);
            loop {
                libc::pause();
            }
        }
    }
    let wait_ready = || {
        let mut got = [0u8];
        // SAFETY: reads one byte into `got`.
        if unsafe { libc::read(ready[0], got.as_mut_ptr().cast(), 1) } != 1 {
            let mut status = 0;
            // SAFETY: waits for our own child.
            unsafe { libc::waitpid(child, &raw mut status, 0) };
            panic!(
                "the namespaced child failed at step {} (exit codes 9-20, see userns_watch)",
                libc::WEXITSTATUS(status)
            );
        }
    };
    // SAFETY: the child holds its own copies.
    unsafe {
        libc::close(ready[1]);
        libc::close(mapped[0]);
    }
    wait_ready();
    std::fs::write(format!("/proc/{child}/uid_map"), format!("0 {kuid} 1\n")).expect("uid_map");
    // SAFETY: writes one byte.
    assert_eq!(
        unsafe { libc::write(mapped[1], [1u8].as_ptr().cast(), 1) },
        1
    );
    wait_ready();
    emit(json!({ "pid": child, "watches": paths.len() }));
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    // SAFETY: ends and reaps our own child.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, std::ptr::null_mut(), 0);
    }
}

fn cgroup_arg(args: &[String]) -> &str {
    args.first().expect("CGROUP-DIR")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = args
        .split_first()
        .expect("usage: ka-sock <pair|listen|connect|storm> ...");
    match cmd.as_str() {
        "pair" => pair(rest),
        "listen" => listen(rest),
        "connect" => connect_cmd(rest),
        "storm" => storm(rest),
        "storms" => storms(),
        "churn" => churn(),
        "hold" => hold_many(rest),
        "userns-watch" => userns_watch(rest),
        "empty-sockops" => attach_sockops(
            cgroup_arg(rest),
            &RETURN_1,
            rest.get(1)
                .map_or(1, |n| n.parse().expect("a number of links")),
        ),
        "minimal-sockops" => attach_sockops(cgroup_arg(rest), &minimal_enforcer(), 1),
        "floor-sockops" => attach_sockops(cgroup_arg(rest), &floor_enforcer(), 1),
        "foreign-sockops" => attach_sockops(cgroup_arg(rest), &enforcer([1, 1, 2], true), 1),
        "rtt-sockops" => attach_sockops(cgroup_arg(rest), &RTT_MONITOR, 1),
        "state-sockops" => attach_sockops(cgroup_arg(rest), &STATE_WATCHER, 1),
        "peak-rss" => peak_rss(rest),
        "unix-answer" => unix_answer(rest),
        other => panic!("unknown command {other}"),
    }
}
