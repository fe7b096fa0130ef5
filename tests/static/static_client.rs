//! A statically linked TCP client for the test suite, compiled by build.rs with
//! `-C target-feature=+crt-static` and no crates: the kind of binary LD_PRELOAD shims cannot
//! reach. It connects to `argv[1]`, prints its socket's keepalive options as one JSON line,
//! and holds the connection until stdin closes.

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::fd::AsRawFd,
};

unsafe extern "C" {
    fn getsockopt(fd: i32, level: i32, name: i32, value: *mut i32, len: *mut u32) -> i32;
}

fn opt(fd: i32, level: i32, name: i32) -> i32 {
    let mut value = -1;
    let mut len = 4u32;
    // SAFETY: getsockopt writes at most `len` bytes into `value`.
    unsafe { getsockopt(fd, level, name, &mut value, &mut len) };
    value
}

fn main() {
    let addr = std::env::args().nth(1).expect("usage: ka-static-client ADDR:PORT");
    let stream = TcpStream::connect(&addr).expect("connect");
    let fd = stream.as_raw_fd();
    let line = format!(
        "{{\"keepalive\":{},\"idle\":{},\"interval\":{},\"count\":{}}}\n",
        opt(fd, 1, 9),
        opt(fd, 6, 4),
        opt(fd, 6, 5),
        opt(fd, 6, 6)
    );
    std::io::stdout().write_all(line.as_bytes()).expect("stdout");
    std::io::stdout().flush().expect("stdout");
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(stream);
}
