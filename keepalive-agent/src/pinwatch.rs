//! Noticing what is removed from the state directory while the agent runs, for the agent to
//! pin it again ([`crate::loader::Enforcer::restore_pins`]). Enforcement outlives the agent
//! through its pins alone; one removed by hand (`rm -rf` on the state directory, say) would
//! end it silently when the agent stops, while only `detach` is to end it.

use std::{
    collections::HashSet,
    io,
    os::unix::ffi::OsStrExt as _,
    time::{Duration, Instant},
};

use inotify::{Inotify, WatchDescriptor, WatchMask};
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    pin::{StateDir, TMP_PIN_SUFFIX},
    watch,
};

/// Everything that takes a name out of a watched directory, or the directory itself.
const MASK: WatchMask = WatchMask::DELETE
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);

/// Watches the state directory and its maps directory, and schedules another look after a
/// restore that failed. While inotify is short (every instance or watch taken), it tries to
/// watch again, waiting longer after each failure, and has the agent look at each try.
pub struct PinWatch {
    state: StateDir,
    /// `None` without inotify, or once given up for good: what was removed is then pinned
    /// again at each try to watch, or, given up, only when the agent stops.
    inotify: Option<AsyncFd<Inotify>>,
    /// The watches held now.
    watches: HashSet<WatchDescriptor>,
    /// Failed restores in a row, and when the next try is due.
    failures: u32,
    retry_at: Option<Instant>,
    /// Failed tries to watch in a row while inotify is short, and when the next is due.
    watch_failures: u32,
    watch_at: Option<Instant>,
    wait: fn(u32) -> Duration,
}

impl std::fmt::Debug for PinWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinWatch")
            .field("state", &self.state)
            .field("watches", &self.watches.len())
            .field("failures", &self.failures)
            .field("watch_failures", &self.watch_failures)
            .finish_non_exhaustive()
    }
}

impl PinWatch {
    /// Starts watching; without inotify, the warning says what that means. `wait(n)` is the
    /// wait after n + 1 failed restores (or tries to watch) in a row.
    pub fn new(state: &StateDir, wait: fn(u32) -> Duration) -> Self {
        let mut watch = Self {
            state: state.clone(),
            inotify: None,
            watches: HashSet::new(),
            failures: 0,
            retry_at: None,
            watch_failures: 0,
            watch_at: None,
            wait,
        };
        watch.watch();
        watch
    }

    /// Gets an inotify instance and watches the directories.
    fn watch(&mut self) {
        let inotify = Inotify::init().and_then(|inotify| {
            // SAFETY: the inotify instance owns its fd, which stays open until the AsyncFd
            // is dropped.
            unsafe { AsyncFd::register_with_interest(inotify, Interest::READABLE) }
                .map_err(|err| err.into_parts().1)
        });
        match inotify {
            Ok(inotify) => {
                self.inotify = Some(inotify);
                self.rewatch();
            }
            Err(err) => self.give_up(&err),
        }
    }

    /// Schedules the next try to watch; returns the wait.
    fn watch_later(&mut self) -> Duration {
        let wait = (self.wait)(self.watch_failures);
        self.watch_failures = self.watch_failures.saturating_add(1);
        self.watch_at = Some(Instant::now() + wait);
        wait
    }

    /// Goes on without inotify after `err`: when it is short, until the next try to watch,
    /// for good otherwise.
    fn give_up(&mut self, err: &io::Error) {
        self.inotify = None;
        self.watches.clear();
        let root = self.state.root().display().to_string();
        if !watch::is_shortage(err) {
            self.watch_at = None;
            log::warn!(
                "cannot watch {root} with inotify: {err}; pins removed from it while the agent \
                 runs are pinned again only when it stops"
            );
            return;
        }
        let wait = self.watch_later();
        if self.watch_failures == 1 {
            log::warn!(
                "cannot watch {root} with inotify: {err}{}; pins removed from it while the agent \
                 runs are pinned again at each try to watch it (the next in {}, then less often, \
                 up to every {}) and when it stops",
                watch::limit_hint(err),
                humantime::format_duration(wait),
                humantime::format_duration((self.wait)(u32::MAX))
            );
        } else {
            log::debug!(
                "still cannot watch {root} with inotify: {err}; looking for removed pins, and \
                 trying again in {}",
                humantime::format_duration(wait)
            );
        }
    }

    /// Stops watching for good (the directory is another agent's now, say).
    pub fn stop(&mut self) {
        self.inotify = None;
        self.watches.clear();
        self.retry_at = None;
        self.watch_at = None;
    }

    /// Watches the directories at their paths now, and no longer those moved away; whether a
    /// watch is new (a directory made again since the last call). A directory that is not
    /// there is not watched: the next call, after it was made again, watches it.
    pub fn rewatch(&mut self) -> bool {
        let Some(inotify) = &mut self.inotify else {
            return false;
        };
        let mut watches = HashSet::new();
        let mut failed = None;
        for dir in [self.state.root().to_owned(), self.state.maps_dir()] {
            match inotify.get_mut().watches().add(&dir, MASK) {
                Ok(wd) => {
                    watches.insert(wd);
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => failed = Some(err),
            }
        }
        // Removed ones are gone already (the kernel says so with an error).
        for stale in self.watches.difference(&watches) {
            let _ = inotify.get_mut().watches().remove(stale.clone());
        }
        if let Some(err) = failed {
            self.give_up(&err);
            return false;
        }
        let fresh = !watches.is_subset(&self.watches);
        self.watches = watches;
        fresh
    }

    /// A restore worked: no try is due.
    pub fn restored(&mut self) {
        self.failures = 0;
        self.retry_at = None;
    }

    /// A restore failed: another try comes after a wait, longer after each failure in a row,
    /// which is returned.
    pub fn failed(&mut self) -> Duration {
        let wait = (self.wait)(self.failures);
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(Instant::now() + wait);
        wait
    }

    /// Waits until something was removed from the directories, or they were (or events were
    /// lost), or a try after a failed restore is due, or, while inotify is short, a try to
    /// watch (made here) was. A try is made only when `may_watch`: following cgroups needs
    /// inotify more, and here each try looks for removed pins all the same. The agent's own
    /// renames of a link pin into place, which take its temporary name away, are not removals.
    /// Cancel-safe. Never returns without inotify and a try due.
    pub async fn removed(&mut self, may_watch: bool) {
        let mut buffer = [0u8; 4096];
        loop {
            let retry = self.retry_at;
            let due = async {
                match retry {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let Some(inotify) = &mut self.inotify else {
                match [retry, self.watch_at].into_iter().flatten().min() {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
                let now = Instant::now();
                if retry.is_some_and(|at| at <= now) {
                    self.retry_at = None;
                }
                if self.watch_at.is_some_and(|at| at <= now) && !may_watch {
                    let wait = self.watch_later();
                    log::debug!(
                        "leaving inotify to following cgroups, which are not all watched; \
                         looking for removed pins, and again in {}",
                        humantime::format_duration(wait)
                    );
                } else if self.watch_at.is_some_and(|at| at <= now) {
                    self.watch_at = None;
                    let failures = self.watch_failures;
                    self.watch();
                    if self.inotify.is_some() {
                        self.watch_failures = 0;
                        // A directory that is not there is watched once the restore that
                        // follows has made it again.
                        let what = if self.watches.is_empty() {
                            "can watch"
                        } else {
                            "watching"
                        };
                        log::info!(
                            "{what} {} with inotify again, after {}",
                            self.state.root().display(),
                            watch::failed_tries(failures)
                        );
                    }
                }
                // What went while nothing watched is looked for at each try.
                return;
            };
            let read = tokio::select! {
                guard = inotify.readable_mut() => match guard {
                    Ok(mut guard) => guard.try_io(|inner| {
                        inner.get_mut().read_events(&mut buffer).map(|events| {
                            events
                                .filter(|event| {
                                    !event.name.is_some_and(|name| {
                                        name.as_bytes().ends_with(TMP_PIN_SUFFIX.as_bytes())
                                    })
                                })
                                .count()
                        })
                    }),
                    Err(err) => Ok(Err(err)),
                },
                () = due => {
                    self.retry_at = None;
                    return;
                }
            };
            match read {
                Ok(Ok(0)) | Err(_) => {}
                Ok(Ok(_)) => return,
                Ok(Err(err)) if err.kind() == io::ErrorKind::WouldBlock => {}
                Ok(Err(err)) => {
                    self.give_up(&err);
                    // Something may have gone meanwhile: look.
                    return;
                }
            }
        }
    }
}
