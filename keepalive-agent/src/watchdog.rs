//! The systemd watchdog and timeout extensions (`sd_notify`) of a running agent, and the signs
//! of progress a control client waiting on a pass gets.

use std::time::{Duration, Instant};

/// The systemd watchdog (`WatchdogSec=`), pinged every half timeout: by the loop, and between
/// network namespaces during an apply pass, which holds the loop for as long as it takes (a
/// walk of the host's TCP hash per namespace, seconds with hundreds of pods).
///
/// While someone waits on the agent, the same moments show progress:
/// - systemd's timeout is pushed out (`EXTEND_TIMEOUT_USEC`) until the agent is ready, and
///   during a reload or a `policy` change. `TimeoutStartSec=` (90 s by default) bounds both the
///   start and `ExecReload=`, and a pass can outlast it on a host with thousands of network
///   namespaces: a start that timed out would be killed and tried again forever, and a reload
///   reported failed with its change in force. Outside a start or a reload, systemd has no
///   timeout for an extension to move.
/// - each control client waiting for its answer, on this pass or behind it, gets a space (see
///   [`crate::control::Waiting`]), which resets its wait for an answer (`policy` gives up after
///   120 s without a byte).
///
/// A pass that stops making progress stops both.
pub struct Watchdog {
    /// Half the timeout; `None` when systemd watches nothing.
    pub period: Option<Duration>,
    last: Instant,
    /// Whether systemd or a control client waits on what the agent does now: its start, a
    /// reload, a `policy` change.
    waited: bool,
    /// The control clients waiting for their answers.
    clients: crate::control::Waiting,
    /// When progress was last shown to those waiting.
    reported: Option<Instant>,
}

/// How far each extension pushes systemd's timeout, from when it is sent...
const EXTENSION: Duration = Duration::from_secs(30);
/// ...and how often progress is shown at most, well within that and `policy`'s wait.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// The shortest time between two watchdog pings.
const MIN_PING_PERIOD: Duration = Duration::from_millis(1);

/// How often to ping for the watchdog `timeout` systemd gave (`WATCHDOG_USEC`): every half
/// of it, at most every [`MIN_PING_PERIOD`]; never for 0, which libsystemd takes as no
/// watchdog too (an environment set by hand, not by systemd).
fn ping_period(timeout: Option<Duration>) -> Option<Duration> {
    timeout
        .filter(|timeout| !timeout.is_zero())
        .map(|timeout| (timeout / 2).max(MIN_PING_PERIOD))
}

impl Watchdog {
    pub fn from_env() -> Self {
        Self {
            period: ping_period(sd_notify::watchdog_enabled()),
            last: Instant::now(),
            waited: true,
            clients: crate::control::Waiting::default(),
            reported: None,
        }
    }

    /// The agent is ready: the start timeout no longer applies.
    pub fn started(&mut self) {
        self.wait_ends();
    }

    /// The control clients waiting for their answers, whom every pass shows progress to, and
    /// takes in when they connect during it.
    pub fn clients(&self) -> crate::control::Waiting {
        self.clients.clone()
    }

    /// A reload or `policy` change begins: the first moment of its pass shows progress at
    /// once.
    pub fn wait_begins(&mut self) {
        self.waited = true;
        self.reported = None;
    }

    /// What was waited on is done.
    pub fn wait_ends(&mut self) {
        self.waited = false;
    }

    pub fn ping(&mut self) {
        if self.period.is_some() {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            self.last = Instant::now();
        }
    }

    /// Pings when half the timeout has passed since the last ping; takes in the control clients
    /// that connected since the last call (see [`crate::control::Waiting::take_in`]); while
    /// someone waits, shows progress when [`REPORT_EVERY`] has passed since it last did.
    pub fn ping_if_due(&mut self) {
        if self
            .period
            .is_some_and(|period| self.last.elapsed() >= period)
        {
            self.ping();
        }
        self.clients.take_in();
        if self.reported.is_some_and(|at| at.elapsed() < REPORT_EVERY)
            || !(self.waited || self.clients.any())
        {
            return;
        }
        if self.waited {
            let usec = u32::try_from(EXTENSION.as_micros()).unwrap_or(u32::MAX);
            let _ = sd_notify::notify(&[sd_notify::NotifyState::ExtendTimeoutUsec(usec)]);
        }
        self.clients.nudge();
        self.reported = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_pinged_every_half_timeout_and_not_for_a_timeout_of_0() {
        let ms = Duration::from_millis;
        assert_eq!(ping_period(Some(ms(400))), Some(ms(200)));
        assert_eq!(ping_period(Some(Duration::from_micros(1))), Some(ms(1)));
        assert_eq!(ping_period(Some(Duration::ZERO)), None);
        assert_eq!(ping_period(None), None);
    }
}
