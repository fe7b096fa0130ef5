//! Accepting clients on the agent's listening sockets (control and metrics) without spinning
//! when accept() fails.

use std::{future::Future, io, time::Duration};

use tokio::time::Instant;

/// How long a listener waits after a failed accept() before it tries again.
pub const RETRY: Duration = Duration::from_secs(1);

/// The pace of one listener's accept() calls. After a failure (out of file descriptors, say)
/// the next try waits [`RETRY`]: a client left in the listen queue keeps the socket readable,
/// so trying again at once would spin. The first failure in a row is a warning, the others are
/// logged at debug level, and the recovery once.
#[derive(Debug)]
pub struct Pacer {
    /// What the log calls the listener.
    what: &'static str,
    /// Set while accept() fails: the next try waits until then.
    paused_until: Option<Instant>,
}

impl Pacer {
    pub const fn new(what: &'static str) -> Self {
        Self {
            what,
            paused_until: None,
        }
    }

    /// The next client `accept` returns. Cancelling this future keeps the pace: the next call
    /// still waits for the pause a failure started.
    pub async fn accept<T, F>(&mut self, mut accept: impl FnMut() -> F) -> T
    where
        F: Future<Output = io::Result<T>>,
    {
        loop {
            if let Some(until) = self.paused_until {
                tokio::time::sleep_until(until).await;
            }
            match accept().await {
                Ok(client) => {
                    if self.paused_until.take().is_some() {
                        log::info!("{}: accepting clients again", self.what);
                    }
                    return client;
                }
                Err(err) => {
                    if self.paused_until.is_none() {
                        log::warn!(
                            "{}: accept failed: {err}; clients wait in the queue, tried again \
                             every {}",
                            self.what,
                            humantime::format_duration(RETRY)
                        );
                    } else {
                        log::debug!("{}: accept failed again: {err}", self.what);
                    }
                    self.paused_until = Some(Instant::now() + RETRY);
                }
            }
        }
    }
}
