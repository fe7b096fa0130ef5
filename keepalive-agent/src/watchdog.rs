//! The systemd watchdog and start-timeout extensions (`sd_notify`) of a running agent.

use std::time::{Duration, Instant};

/// The systemd watchdog (`WatchdogSec=`), pinged every half timeout: by the loop, and between
/// network namespaces during an apply pass, which holds the loop for as long as it takes (a
/// walk of the host's TCP hash per namespace, seconds with hundreds of pods).
///
/// Until the agent is ready, the same moments push systemd's start timeout out
/// (`EXTEND_TIMEOUT_USEC`): the first pass, before READY=1, can take longer than
/// `TimeoutStartSec=` (90 s by default) on a host with thousands of network namespaces, and a
/// start that timed out would be killed and tried again forever. A pass that stops making
/// progress stops extending it.
pub struct Watchdog {
    /// Half the timeout; `None` when systemd watches nothing.
    pub period: Option<Duration>,
    last: Instant,
    /// Whether the agent is still starting (not ready yet).
    starting: bool,
    /// When the start timeout was last extended.
    extended: Option<Instant>,
}

/// How far each extension pushes the start timeout, from when it is sent...
const START_EXTENSION: Duration = Duration::from_secs(30);
/// ...and how often it is sent at most, well within that.
const START_EXTEND_EVERY: Duration = Duration::from_secs(5);

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
            starting: true,
            extended: None,
        }
    }

    /// The agent is ready: the start timeout no longer applies.
    pub fn started(&mut self) {
        self.starting = false;
    }

    pub fn ping(&mut self) {
        if self.period.is_some() {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            self.last = Instant::now();
        }
    }

    /// Pings when half the timeout has passed since the last ping; while starting, extends the
    /// start timeout when [`START_EXTEND_EVERY`] has passed since the last extension.
    pub fn ping_if_due(&mut self) {
        if self
            .period
            .is_some_and(|period| self.last.elapsed() >= period)
        {
            self.ping();
        }
        if self.starting
            && self
                .extended
                .is_none_or(|at| at.elapsed() >= START_EXTEND_EVERY)
        {
            let usec = u32::try_from(START_EXTENSION.as_micros()).unwrap_or(u32::MAX);
            let _ = sd_notify::notify(&[sd_notify::NotifyState::ExtendTimeoutUsec(usec)]);
            self.extended = Some(Instant::now());
        }
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
