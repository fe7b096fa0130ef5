//! Noticing what is removed from the state directory while the agent runs, for the agent to
//! pin it again ([`crate::loader::Enforcer::restore_pins`]). Enforcement outlives the agent
//! through its pins alone; one removed by hand (`rm -rf` on the state directory, say) would
//! end it silently when the agent stops, while only `detach` is to end it.

use std::{collections::HashSet, io};

use inotify::{Inotify, WatchDescriptor, WatchMask};
use tokio::io::{Interest, unix::AsyncFd};

use crate::pin::StateDir;

/// Everything that takes a name out of a watched directory, or the directory itself.
const MASK: WatchMask = WatchMask::DELETE
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);

/// Watches the state directory and its maps directory.
pub struct PinWatch {
    state: StateDir,
    /// `None` without inotify (every instance taken): what was removed is then pinned again
    /// only when the agent stops.
    inotify: Option<AsyncFd<Inotify>>,
    /// The watches held now.
    watches: HashSet<WatchDescriptor>,
}

impl std::fmt::Debug for PinWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinWatch")
            .field("state", &self.state)
            .field("watches", &self.watches.len())
            .finish_non_exhaustive()
    }
}

impl PinWatch {
    /// Starts watching; without inotify, the warning says what that means.
    pub fn new(state: &StateDir) -> Self {
        let inotify = Inotify::init().and_then(|inotify| {
            // SAFETY: the inotify instance owns its fd, which stays open until the AsyncFd
            // is dropped.
            unsafe { AsyncFd::register_with_interest(inotify, Interest::READABLE) }
                .map_err(|err| err.into_parts().1)
        });
        let mut watch = Self {
            state: state.clone(),
            inotify: None,
            watches: HashSet::new(),
        };
        match inotify {
            Ok(inotify) => {
                watch.inotify = Some(inotify);
                watch.rewatch();
            }
            Err(err) => watch.give_up(&err),
        }
        watch
    }

    fn give_up(&mut self, err: &io::Error) {
        log::warn!(
            "cannot watch {} with inotify: {err}; pins removed from it while the agent runs are \
             pinned again only when it stops",
            self.state.root().display()
        );
        self.inotify = None;
        self.watches.clear();
    }

    /// Watches the directories at their paths now; whether a watch is new (a directory made
    /// again since the last call). A directory that is not there is not watched: the next
    /// call, after it was made again, watches it.
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
        if let Some(err) = failed {
            self.give_up(&err);
            return false;
        }
        let fresh = !watches.is_subset(&self.watches);
        self.watches = watches;
        fresh
    }

    /// Waits until something was removed from the directories, or they were (or events were
    /// lost). Cancel-safe. Never returns without inotify.
    pub async fn removed(&mut self) {
        let mut buffer = [0u8; 4096];
        loop {
            let Some(inotify) = &mut self.inotify else {
                return std::future::pending().await;
            };
            let read = match inotify.readable_mut().await {
                Ok(mut guard) => guard.try_io(|inner| {
                    inner
                        .get_mut()
                        .read_events(&mut buffer)
                        .map(|events| events.count())
                }),
                Err(err) => Ok(Err(err)),
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
