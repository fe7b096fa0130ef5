//! `run`: start-up in a safe order, then a single event loop that sleeps until a signal, a
//! control request or a cgroup change arrives.
//!
//! Start-up validates everything (privileges, cgroups, config, BTF, the pinned state) before it
//! touches the kernel; then it loads, pushes the policy table, attaches (or takes over the
//! pinned attachment), applies the policy to existing connections and reports readiness.

use std::{
    collections::{BTreeSet, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use keepalive_common::{
    DEFAULT_MAX_TRACKED_CGROUPS, DEFAULT_MAX_TRACKED_SOCKETS, Policy, mode, policy_flags,
};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::{
    apply::{self, ApplyReport},
    btf::{self, Btf},
    cgroup::{Cgroup2, CgroupPath},
    cli::RunArgs,
    config::{self, Config, DefaultOverrides},
    control,
    error::Error,
    foreign, instance,
    loader::{self, Enforcer, LoadOptions},
    logging::counted,
    metrics,
    pin::{self, StateDir},
    pinwatch::PinWatch,
    policy::{self, Mode, PolicySet, Resolution, Rule, Source, Spec},
    privileges,
    takeover::{replaced, warn_replaced},
    watch::{Follower, Following},
    watchdog::Watchdog,
};

mod rules;

/// Everything the running agent keeps.
struct Daemon {
    cgroup2: Cgroup2,
    /// `run`'s flags (and `--state-dir`), which a reload resolves the config under again.
    args: RunArgs,
    cli_state: Option<PathBuf>,
    /// What the agent started with, which a reload cannot change.
    fixed: Fixed,
    config: Config,
    runtime: Vec<Rule>,
    enforcer: Enforcer,
    resolution: Resolution,
    table: Vec<(u64, Policy)>,
    lock_attached: bool,
    /// No policy uses lock, but taking the lock program out failed: tried again as a failed
    /// push is (see [`Daemon::detach_lock`]).
    lock_stuck: bool,
    /// The table changed but no apply pass has succeeded since.
    apply_pending: bool,
    /// A cgroup change left a pass to run, at [`Daemon::due`].
    pass_scheduled: bool,
    /// A failed push is tried again at this time (see [`Daemon::retry_later`]).
    retry_at: Option<Instant>,
    /// Failed pushes in a row, for the wait before the next try.
    failures: u32,
    /// Failed passes in a row since the last that succeeded; the next waits longer.
    pass_failures: u32,
    /// When the last apply pass ended, and how long it took.
    last_pass: Option<(Instant, Duration)>,
    /// `off` cgroups the agent saw appear, for [`policy_flags::NEW_CGROUP`].
    new_cgroups: NewCgroups,
    watchdog: Watchdog,
}

/// What `run` resolves once, from its flags and then the config: a reload cannot change it.
#[derive(Debug, Clone)]
struct Fixed {
    attach: CgroupPath,
    state: StateDir,
    metrics: Option<SocketAddr>,
    max_tracked_cgroups: Option<u32>,
    max_tracked_sockets: Option<u32>,
}

impl Fixed {
    fn resolve(
        cli_state: Option<&Path>,
        args: &RunArgs,
        config: &Config,
        cgroup2: &Cgroup2,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            attach: config.attach_cgroup(args.cgroup.as_deref(), cgroup2)?,
            state: StateDir::resolve(cli_state.map(Path::to_owned), || config.state_dir.clone()),
            metrics: args.metrics.or(config.metrics),
            max_tracked_cgroups: args.max_tracked_cgroups.or(config.max_tracked_cgroups),
            max_tracked_sockets: args.max_tracked_sockets.or(config.max_tracked_sockets),
        })
    }

    /// A warning for each setting of `config`'s file that a flag given to `run` overrides
    /// with another value, at start and at each reload: `check`, `status` and `detach` read the
    /// file, and a start without the flag would take the file's, so it no longer tells what
    /// runs. (The `[default]` values' flags have theirs from [`Config::apply_overrides`].)
    fn flag_notes(&self, config: &Config, cgroup2: &Cgroup2) -> Vec<String> {
        let Some(file) = &config.file else {
            return Vec::new();
        };
        let file = file.display();
        let at = |line: Option<usize>| match line {
            Some(line) => format!("{file}:{line}"),
            None => file.to_string(),
        };
        let mut notes = Vec::new();
        let mut note = |flag: &str, given: String, key: &str, in_file: String, line, then: &str| {
            notes.push(format!(
                "--{flag} {given} given to `run` takes the place of {key} = {in_file} at {}; \
                 {then}",
                at(line)
            ));
        };
        // Compared as cgroups: spelt otherwise, the same one is no override.
        if let Some((text, line)) = &config.attach
            && config
                .attach_cgroup(None, cgroup2)
                .is_ok_and(|path| path != self.attach)
        {
            note(
                "cgroup",
                self.attach.to_string(),
                "attach",
                format!("{text:?}"),
                Some(*line),
                "`check` reads the file's, and a start without --cgroup would refuse to move \
                 enforcement there (exit 7)",
            );
        }
        if let Some(state) = &config.state_dir
            && state.root() != self.state.root()
        {
            note(
                "state-dir",
                self.state.root().display().to_string(),
                "state_dir",
                format!("{:?}", state.root().display().to_string()),
                state.line(),
                "`status`, `detach` and `check` find this agent's state only when given the \
                 same --state-dir",
            );
        }
        if let Some(metrics) = config.metrics
            && self.metrics != Some(metrics)
        {
            let given = self.metrics.map_or("off".to_owned(), |a| a.to_string());
            note(
                "metrics",
                given,
                "metrics",
                format!("\"{metrics}\""),
                None,
                "`check` checks the file's",
            );
        }
        for (flag, given, in_file) in [
            (
                "max-tracked-cgroups",
                self.max_tracked_cgroups,
                config.max_tracked_cgroups,
            ),
            (
                "max-tracked-sockets",
                self.max_tracked_sockets,
                config.max_tracked_sockets,
            ),
        ] {
            if let (Some(given), Some(in_file)) = (given, in_file)
                && given != in_file
            {
                note(
                    flag,
                    given.to_string(),
                    &flag.replace('-', "_"),
                    in_file.to_string(),
                    None,
                    "a start without the flag would size new maps from the file",
                );
            }
        }
        notes
    }

    /// How a restart with `next` would differ from the running agent, each with what it takes.
    fn changes(&self, next: &Self) -> Vec<String> {
        let mut notes = Vec::new();
        let mut note = |what: &str, old: String, new: String, takes: &str| {
            if old != new {
                notes.push(format!(
                    "{what} changed in the config ({old} -> {new}); {takes}"
                ));
            }
        };
        let detach = self.state.detach_command();
        note(
            "attach",
            self.attach.to_string(),
            next.attach.to_string(),
            &format!(
                "moving enforcement takes stopping the agent, `{detach}` and a start (a start \
                 alone is refused, exit 7)"
            ),
        );
        // Named: once the config names the new one, a plain `detach` would look there.
        let old_state = self.state.root().display().to_string();
        note(
            "state_dir",
            old_state.clone(),
            next.state.root().display().to_string(),
            &format!(
                "it takes stopping the agent and `keepalive-agent --state-dir {old_state} \
                 detach` before the start (a start alone is refused while the enforcement \
                 pinned there is on the attach cgroup, exit 7)"
            ),
        );
        let addr =
            |metrics: Option<SocketAddr>| metrics.map_or("off".to_owned(), |a| a.to_string());
        note(
            "metrics",
            addr(self.metrics),
            addr(next.metrics),
            "it takes effect at the next restart",
        );
        let resize = format!("the pinned maps keep their size until `{detach}` and a restart");
        let size = |n: Option<u32>, default: u32| n.unwrap_or(default).to_string();
        note(
            "max_tracked_cgroups",
            size(self.max_tracked_cgroups, DEFAULT_MAX_TRACKED_CGROUPS),
            size(next.max_tracked_cgroups, DEFAULT_MAX_TRACKED_CGROUPS),
            &resize,
        );
        note(
            "max_tracked_sockets",
            size(self.max_tracked_sockets, DEFAULT_MAX_TRACKED_SOCKETS),
            size(next.max_tracked_sockets, DEFAULT_MAX_TRACKED_SOCKETS),
            &resize,
        );
        notes
    }
}

/// Marks the error of a rejected change whose previous policy could not be put back yet (see
/// [`Daemon::transact`]).
#[derive(Debug)]
struct NotRestored;

impl std::fmt::Display for NotRestored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "rejected, but the previous policy could not be put back yet (the agent keeps trying \
             and logs each failure), so the kernel may hold the rejected one \
             until then",
        )
    }
}

/// What stays after change `err` was rejected, for its log line.
fn what_stays(err: &anyhow::Error) -> &'static str {
    if err.downcast_ref::<NotRestored>().is_some() {
        ""
    } else {
        ", the previous policies stay"
    }
}

/// The wait before trying a failed push or pass again, doubled after each failure in a row...
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// ...up to this.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The wait after `failures` + 1 failures in a row.
fn retry_wait(failures: u32) -> Duration {
    (RETRY_FIRST * (1 << failures.min(5))).min(RETRY_MAX)
}

/// How long after a pass a cgroup change's pass waits, in units of that pass's duration...
const PASS_SPACING: u32 = 9;
/// ...and at most, so that sockets a new cgroup had before the agent saw it get its policy
/// within this long on the largest hosts too.
const PASS_WAIT_MAX: Duration = Duration::from_secs(30);

/// Which `off` cgroups are new. Until the agent has seen a new cgroup, the program gives its
/// sockets an ancestor's policy. An `off` entry for a cgroup that did not exist when the agent
/// last looked is marked [`policy_flags::NEW_CGROUP`] in every table until an apply pass has
/// run, so the pass releases what the program enforced there, as if the cgroup had been `off`
/// from the start. It goes by cgroup id, whatever made the agent look (an inotify batch,
/// `policy set`, a reload): a cgroup the agent had seen before is not new, and a mark survives
/// a failed push or pass. What the agent has seen outlives it, in the pinned
/// `keepalive_common::MAP_AGENT` (see [`NewCgroups::seen`]), so a cgroup created while no
/// agent ran is new at the next start.
#[derive(Debug, Default, Clone)]
struct NewCgroups {
    /// What the last agent kept ([`NewCgroups::new`]): what this one keeps never goes below.
    floor: u64,
    /// Every cgroup below the attach cgroup when the agent last looked.
    known: HashSet<u64>,
    /// `off` cgroups to mark until a pass has run.
    off: HashSet<u64>,
}

impl NewCgroups {
    /// Starts with the cgroups that exist now and those of the first table, except those with
    /// an id above `seen`, what the last agent over this state kept of what it had seen
    /// ([`NewCgroups::seen`]). Cgroup ids only grow, so those were created while no agent
    /// ran, and the program gave their sockets an ancestor's policy. Whatever the program did
    /// in the others, and in all of them when `seen` is 0 (no agent kept it), stays as `off`
    /// leaves it.
    fn new(present: HashSet<u64>, table: &[(u64, Policy)], seen: u64) -> Self {
        let known = present
            .iter()
            .copied()
            .chain(table.iter().map(|(id, _)| *id))
            .filter(|&id| seen == 0 || id <= seen)
            .collect();
        let mut new = Self {
            floor: seen,
            known,
            off: HashSet::new(),
        };
        new.update(present, table);
        new
    }

    /// What the next start takes as seen: the highest cgroup id seen, or, while `off` cgroups
    /// still wait for their pass, one below the lowest of them, so that a start before that
    /// pass finds them new too; never below what the last agent kept, which would make a start
    /// take cgroups that agent had seen for new.
    fn seen(&self) -> u64 {
        let highest = self.known.iter().copied().max().unwrap_or(0);
        let seen = self
            .off
            .iter()
            .copied()
            .min()
            .map_or(highest, |lowest| highest.min(lowest.saturating_sub(1)));
        seen.max(self.floor)
    }

    /// Notes the cgroups `present` (listed before `table` was resolved, so one created in
    /// between is new next time) and which of `table`'s `off` entries are new.
    fn update(&mut self, present: HashSet<u64>, table: &[(u64, Policy)]) {
        let ids: HashSet<u64> = table.iter().map(|(id, _)| *id).collect();
        self.off.retain(|id| ids.contains(id));
        let new_off = table
            .iter()
            .filter(|(id, policy)| policy.mode == mode::OFF && !self.known.contains(id))
            .map(|(id, _)| *id);
        self.off.extend(new_off);
        self.known = present;
        self.known.extend(ids);
    }

    /// `table` as pushed, with the new `off` entries marked.
    fn mark(&self, table: &[(u64, Policy)]) -> Vec<(u64, Policy)> {
        table
            .iter()
            .map(|&(id, mut policy)| {
                if policy.mode == mode::OFF && self.off.contains(&id) {
                    policy.flags |= policy_flags::NEW_CGROUP;
                }
                (id, policy)
            })
            .collect()
    }

    /// A pass ran (or none can run on this kernel): the marks have done their work.
    fn passed(&mut self) {
        self.off.clear();
    }
}

/// Warns about each cgroup `next` could not read that `previous` could, once.
fn warn_unreadable(previous: &Resolution, next: &Resolution) {
    for (path, err) in &next.unreadable {
        if !previous.unreadable.contains_key(path) {
            log::warn!(
                "cannot read cgroup {path} ({err}): policies for cgroups below it do not apply, \
                 and their connections get the policy of {path} or of its nearest ancestor with \
                 one. The agent runs without CAP_DAC_READ_SEARCH (see README \"Capabilities\"): \
                 give root read and search permission on the directory (chmod o+rx) and restart \
                 the agent, which until then does not follow cgroups created below it"
            );
        }
    }
}

fn overrides_from(args: &RunArgs) -> DefaultOverrides {
    DefaultOverrides {
        idle: args.values.idle,
        interval: args.values.interval,
        count: args.values.count,
        user_timeout_ms: args.values.user_timeout,
    }
}

impl Daemon {
    /// The effective rules in precedence order: exact paths before globs, and within each,
    /// runtime changes before the config (the latest change first; config rules keep their
    /// file order).
    fn rules(&self) -> impl Iterator<Item = &Rule> {
        let kind = |glob: bool| {
            self.runtime
                .iter()
                .chain(&self.config.policies.rules)
                .filter(move |r| r.selector.is_glob() == glob)
        };
        kind(false).chain(kind(true))
    }

    /// The config's default with the effective rules.
    fn policy_set(&self) -> PolicySet {
        let policies = &self.config.policies;
        PolicySet {
            default: policies.default,
            default_source: policies.default_source.clone(),
            rules: self.rules().cloned().collect(),
        }
    }

    /// Re-resolves the policy against the cgroups that exist now and pushes the table if it
    /// changed, with new `off` cgroups marked (see [`NewCgroups`]). Applies it to existing
    /// connections when it changed (or an earlier pass failed). Only a failed push is an
    /// error: once the table is in, it is in force for new connections, and a pass that fails
    /// is tried again later (`when` says after what, for the log), as one after a cgroup
    /// change is; the warning that says so comes with the pass's report.
    fn refresh(&mut self, when: &str) -> anyhow::Result<(Option<ApplyReport>, Option<String>)> {
        self.push()?;
        self.table_caught_up();
        if !self.apply_pending {
            self.pass_scheduled = false;
            self.pass_failures = 0;
            return Ok((None, None));
        }
        match self.apply() {
            Ok(report) => {
                self.pass_failures = 0;
                Ok((report, None))
            }
            Err(err) => {
                let wait = self.pass_failed(&err, when);
                Ok((
                    None,
                    Some(format!(
                        "the policy is in force for new connections, but the pass over existing \
                         ones failed: {err:#}; trying again in {}",
                        humantime::format_duration(wait)
                    )),
                ))
            }
        }
    }

    /// The table is up to date: no push needs trying again (unless the lock program still
    /// has to come out, which keeps its try).
    fn table_caught_up(&mut self) {
        if self.lock_stuck {
            return;
        }
        self.retry_at = None;
        self.failures = 0;
    }

    /// Takes the lock program out, after a table that no longer uses lock went in. Where that
    /// fails, the table and the change that made it stand all the same (the program holds
    /// only sockets that have a lock record, and a pass under the new table takes those
    /// away), and the removal is tried again as a failed push would be.
    fn detach_lock(&mut self) {
        match self.enforcer.set_lock(false) {
            Ok(()) => {
                self.lock_attached = false;
                self.lock_stuck = false;
            }
            Err(err) => {
                self.lock_attached = true;
                self.lock_stuck = true;
                let wait = self.retry_later();
                log::warn!(
                    "no policy uses lock mode, but the setsockopt program could not be taken \
                     out: {err:#}; it holds only sockets that still have a lock record; trying \
                     again in {}",
                    humantime::format_duration(wait)
                );
            }
        }
    }

    /// Schedules the next try after a failure to push a table, which otherwise would wait for
    /// the next cgroup change or request: 1 s after the first failure in a row, doubling up to
    /// [`RETRY_MAX`]. Returns the wait.
    fn retry_later(&mut self) -> Duration {
        let wait = retry_wait(self.failures);
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(Instant::now() + wait);
        wait
    }

    /// [`Daemon::refresh`] for cgroups that came or went: the table goes in at once, for new
    /// connections, and the pass over existing ones waits until [`Daemon::due`].
    fn follow_cgroups(&mut self) -> anyhow::Result<()> {
        let before: BTreeSet<u64> = self.resolution.entries.keys().copied().collect();
        self.push()?;
        for line in new_entries(&before, &self.resolution) {
            log::info!("{line}");
        }
        self.pass_scheduled = self.apply_pending;
        self.table_caught_up();
        Ok(())
    }

    /// When the pass a cgroup change left is due, if one is: [`PASS_SPACING`] times as long
    /// as the last pass took after it ended, up to [`PASS_WAIT_MAX`], so that however fast
    /// containers come and go, passes for them take at most a tenth of one CPU (unless a pass
    /// takes over 3.3 s). On a host with few connections a pass takes milliseconds, and so does
    /// the wait; with 200000 sockets, about 0.3 s and 2.7 s. Only the connections that already
    /// existed when a cgroup appeared wait, in the cgroup's ancestor's policy: new ones get the
    /// new table at once.
    ///
    /// After a failed pass the next waits at least as long as a failed push would
    /// ([`retry_wait`]), from the failed one's end.
    fn pass_due(&self) -> Option<Instant> {
        if !self.pass_scheduled {
            return None;
        }
        let Some((ended, took)) = self.last_pass else {
            return Some(Instant::now());
        };
        let paced = ended + (took * PASS_SPACING).min(PASS_WAIT_MAX);
        Some(match self.pass_failures {
            0 => paced,
            failures => paced.max(ended + retry_wait(failures - 1)),
        })
    }

    /// When the loop has something to do: a scheduled pass, or a push to try again.
    fn due(&self) -> Option<Instant> {
        match (self.pass_due(), self.retry_at) {
            (Some(pass), Some(retry)) => Some(pass.min(retry)),
            (pass, retry) => pass.or(retry),
        }
    }

    /// Runs what [`Daemon::due`] found due: a push to try again, which schedules the pass it
    /// calls for, or else the scheduled pass. A failed one is tried again later, and the log
    /// says when.
    fn run_due(&mut self) {
        if self.retry_at.is_some_and(|at| at <= Instant::now()) {
            self.retry_at = None;
            if let Err(err) = self.follow_cgroups() {
                let wait = self.retry_later();
                log::error!(
                    "failed to follow cgroup changes: {err:#}; trying again in {}",
                    humantime::format_duration(wait)
                );
            }
            return;
        }
        match self.apply() {
            Ok(_) => self.pass_failures = 0,
            // A pass tried again (after one at start, say) was not for cgroup changes.
            Err(err) if self.pass_failures == 0 => {
                self.pass_failed(&err, " after cgroup changes");
            }
            Err(err) => {
                self.pass_failed(&err, "");
            }
        }
    }

    /// Schedules the next try of a pass that failed (`when`: " at start", say), waiting longer after each
    /// failure in a row (see [`Daemon::pass_due`]), and logs when it comes; returns the wait,
    /// in whole seconds.
    fn pass_failed(&mut self, err: &anyhow::Error, when: &str) -> Duration {
        self.pass_failures = self.pass_failures.saturating_add(1);
        self.pass_scheduled = true;
        self.apply_pending = true;
        let wait = self.pass_due().map_or(Duration::ZERO, |at| {
            at.saturating_duration_since(Instant::now())
        });
        let wait = Duration::from_secs(wait.as_secs_f64().ceil() as u64);
        log::error!(
            "failed to apply the policy to existing connections{when}: {err:#}; trying again \
             in {}",
            humantime::format_duration(wait)
        );
        wait
    }

    /// Resolves the policy and pushes the table if it changed (see [`Daemon::refresh`]).
    fn push(&mut self) -> anyhow::Result<()> {
        let set = self.policy_set();
        // Listed before resolving: a cgroup created in between is new next time.
        let present = self.cgroup2.readable_ids(&self.fixed.attach)?;
        let resolution = set.resolve(&self.cgroup2, &self.fixed.attach)?;
        let table = resolution.table(&set.default, self.enforcer.attach_id());
        let changed = table != self.table;
        let lock = set.uses_lock();
        // The lock program goes in before a table that uses lock, and out after the table
        // that stops using it, so no locked socket is ever without it.
        // Also over one that could not be taken out, which this agent may no longer hold.
        if lock && (!self.lock_attached || self.lock_stuck) {
            self.enforcer.set_lock(true)?;
            self.lock_attached = true;
        }
        if lock {
            self.lock_stuck = false;
        }
        // New entries always change the table: the previous one's ids are all known. Noted
        // only once the table is in: a cgroup a failed push (and the rollback after it) took
        // for known would lose its mark as a new `off` cgroup.
        let mut new_cgroups = self.new_cgroups.clone();
        new_cgroups.update(present, &table);
        if changed {
            self.enforcer.push_table(&new_cgroups.mark(&table))?;
            log::info!(
                "policy table: default {} plus {}",
                describe_spec(&set.default),
                counted(
                    resolution.entries.len() as u64,
                    "cgroup policy",
                    "cgroup policies"
                )
            );
            self.table = table;
            // Existing connections still have the previous policy until a pass succeeds.
            self.apply_pending = true;
        }
        self.new_cgroups = new_cgroups;
        self.keep_seen();
        if !lock && self.lock_attached {
            self.detach_lock();
        }
        warn_unreadable(&self.resolution, &resolution);
        self.resolution = resolution;
        Ok(())
    }

    /// Applies the table to existing connections, when the kernel can.
    fn apply(&mut self) -> anyhow::Result<Option<ApplyReport>> {
        self.pass_scheduled = false;
        let start = Instant::now();
        let report = self.enforcer.apply_existing(|| self.watchdog.ping_if_due());
        self.last_pass = Some((Instant::now(), start.elapsed()));
        let report = report?;
        // Without the iterator there is no pass that could release anything.
        self.new_cgroups.passed();
        self.keep_seen();
        if let Some(report) = &report {
            self.apply_pending = false;
            log::info!("{}", apply::describe(report));
        }
        Ok(report)
    }

    /// Keeps what the agent has seen for the next start (see [`NewCgroups`]). Without it, the
    /// next start takes a cgroup created since the last write as seen.
    fn keep_seen(&mut self) {
        if let Err(err) = self.enforcer.set_seen_cgroups(self.new_cgroups.seen()) {
            log::warn!("{err:#}; after a restart, cgroups created until then count as seen");
        }
    }

    /// Runs a change to the config or the runtime rules and pushes the result. If that fails,
    /// the previous rules come back, and are pushed again if the push had begun, so nothing
    /// stays half-applied. A change refused before it pushed leaves the kernel alone. Once its
    /// table is in, the change stands: a pass over existing connections that fails then is
    /// tried again later, and the answer says so (rejecting the change for it would also
    /// refuse every later one, an emergency `--mode off` among them, while the cause lasts).
    fn transact(
        &mut self,
        change: impl FnOnce(&mut Self) -> anyhow::Result<String>,
    ) -> anyhow::Result<(String, Option<ApplyReport>)> {
        let saved = (self.config.clone(), self.runtime.clone());
        // What the kernel holds now, to tell whether a failed change left it there.
        let held = self.table.clone();
        let message = match change(self) {
            Ok(message) => message,
            Err(err) => {
                (self.config, self.runtime) = saved;
                return Err(err);
            }
        };
        let err = match self.refresh(" after the change") {
            Ok((report, warning)) => {
                let mut message = message;
                if let Some(warning) = warning {
                    message.push_str(&format!("\nwarning: {warning}"));
                }
                return Ok((message, report));
            }
            Err(err) => err,
        };
        (self.config, self.runtime) = saved;
        if let Err(restore) = self.refresh(" after restoring the previous policy") {
            let wait = self.retry_later();
            log::error!(
                "failed to restore the previous policy: {restore:#}; trying again in {}",
                humantime::format_duration(wait)
            );
            // The rejected table may be the kernel's until a try succeeds: the answer and the
            // rejection's log line must not say the previous one stays. Unless it never went
            // in (the change failed before its push, or the restore pushed the previous one
            // back before it failed on).
            if self.table != held {
                return Err(err.context(NotRestored));
            }
        }
        Err(err)
    }

    /// Pins again what was removed from the state directory while the agent ran (see
    /// [`PinWatch`]), and watches what was made again. A failure is tried again later, unless
    /// another agent holds the directory now, or the agent is `exiting`, which the log says.
    fn restore_pins(&mut self, lock: &mut std::fs::File, watch: &mut PinWatch, exiting: bool) {
        let when = if exiting { " as it exits" } else { "" };
        let root = self.fixed.state.root().display().to_string();
        let mut restored: Vec<String> = Vec::new();
        // A directory made again is watched, and then looked at once more for what went
        // before the watch held (`rm -rf` may still be at work); a few rounds at most.
        for _ in 0..3 {
            match self.enforcer.restore_pins(lock) {
                Ok(names) => {
                    for name in names {
                        if !restored.contains(&name) {
                            restored.push(name);
                        }
                    }
                }
                Err(err) if matches!(err.downcast_ref::<Error>(), Some(Error::Agent(_))) => {
                    watch.stop();
                    log::error!(
                        "{root} was removed while the agent ran, and is not its own any more: \
                         {err:#}; enforcement holds while this agent runs, and ends when it stops"
                    );
                    return;
                }
                Err(err) if exiting => {
                    log::error!(
                        "failed to pin again what was removed from {root} as the agent exits: \
                         {err:#}; enforcement ends with the agent"
                    );
                    return;
                }
                Err(err) => {
                    watch.rewatch();
                    let wait = watch.failed();
                    log::error!(
                        "failed to pin again what was removed from {root}: {err:#}; trying again \
                         in {} (enforcement holds while the agent runs)",
                        humantime::format_duration(wait)
                    );
                    return;
                }
            }
            if !watch.rewatch() {
                break;
            }
        }
        watch.restored();
        if !restored.is_empty() {
            log::warn!(
                "{} removed from {root} while the agent ran: made and pinned again{when}, so \
                 enforcement stays when the agent stops; to end it, stop the agent and run \
                 `{}`",
                restored.join(", "),
                self.fixed.state.detach_command()
            );
        }
    }
}

/// Logs the message of a change that succeeded: its first line as information, the
/// `warning: ` lines after it as warnings.
fn log_outcome(message: &str) {
    let mut lines = message.lines();
    if let Some(first) = lines.next() {
        log::info!("{first}");
    }
    for line in lines {
        log::warn!("{}", line.strip_prefix("warning: ").unwrap_or(line));
    }
}

/// Log lines naming the cgroups of `now` with a policy that had none in `before` (a new cgroup
/// a glob or a pending path picked up), each with the rule it got it from; after five, how
/// many more.
fn new_entries(before: &BTreeSet<u64>, now: &Resolution) -> Vec<String> {
    const SHOWN: usize = 5;
    let new: Vec<&policy::Entry> = now
        .entries
        .iter()
        .filter(|(id, _)| !before.contains(id))
        .map(|(_, entry)| entry)
        .collect();
    let mut lines: Vec<String> = new
        .iter()
        .take(SHOWN)
        .map(|entry| {
            let rule = if entry.selector == entry.cgroup.to_string() {
                String::new()
            } else {
                format!(" for {}", entry.selector)
            };
            format!(
                "cgroup {} got the policy{rule} ({}): {}",
                entry.cgroup,
                entry.source,
                describe_spec(&entry.spec)
            )
        })
        .collect();
    if new.len() > SHOWN {
        lines.push(format!(
            "and {} more new cgroups got a policy of their own",
            new.len() - SHOWN
        ));
    }
    lines
}

fn describe_spec(spec: &Spec) -> String {
    match spec.mode {
        Mode::Off => "off".to_owned(),
        mode => {
            let secs = |secs: u32| crate::status::duration_cell(Duration::from_secs(secs.into()));
            let mut out = format!(
                "{mode} idle {} interval {} count {}",
                secs(spec.values.idle),
                secs(spec.values.interval),
                spec.values.count
            );
            if let Some(ms) = spec.values.user_timeout_ms {
                let ms = crate::status::duration_cell(Duration::from_millis(ms.into()));
                out.push_str(&format!(" user_timeout {ms}"));
            }
            out
        }
    }
}

/// Options of `run` that come from the global flags.
#[derive(Debug)]
pub struct Globals {
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--runtime-dir`.
    pub runtime_dir: PathBuf,
}

fn bpf_log_level() -> u8 {
    if log::log_enabled!(target: "keepalive_ebpf", log::Level::Debug) {
        aya_log::Level::Debug as u8
    } else {
        0
    }
}

/// Refuses to attach where another state directory's keepalive program already runs on the
/// attach cgroup: both would set keepalive on every socket, and the later one would win. One
/// on an ancestor or below is only warned about; scoping agents to nested subtrees is allowed.
fn refuse_foreign_enforcement(
    cgroup2: &Cgroup2,
    attach: &CgroupPath,
    state: &StateDir,
    ours: Option<u32>,
) -> anyhow::Result<()> {
    let path = cgroup2.abs(attach);
    let dir =
        std::fs::File::open(&path).with_context(|| format!("failed to open {}", path.display()))?;
    let roots = foreign::search_roots(state);
    let found = match foreign::enforcement(cgroup2, attach, &dir, ours, &roots) {
        Ok(found) => found,
        Err(err) => {
            log::warn!("cannot tell whether other keepalive enforcement runs on {attach}: {err}");
            return Ok(());
        }
    };
    for other in &found {
        if other.place == foreign::Place::Here {
            return Err(Error::Agent(other.refusal(attach, &roots)).into());
        }
        log::warn!("{}", other.overlap(attach, cgroup2, &roots));
    }
    Ok(())
}

/// `keepalive-agent run`.
pub async fn run(globals: Globals, args: RunArgs) -> anyhow::Result<()> {
    // A SIGHUP while starting (loading BTF, the programs, the first pass) would otherwise end
    // the process; caught from here on, it becomes a reload once the loop runs, which picks up
    // a config changed meanwhile. SIGTERM and SIGINT end a start at once until the state
    // directory is made (below).
    let mut hup = signal(SignalKind::hangup())?;
    // Everything that can be checked without touching the kernel comes first.
    loader::require_object()?;
    privileges::require_for("run")?;
    let cgroup2 = Cgroup2::find()?;
    let mut config = config::load(args.config.as_deref(), &cgroup2)?;
    for note in config.apply_overrides(&overrides_from(&args)) {
        log::warn!("{note}");
    }
    let fixed = Fixed::resolve(globals.state_dir.as_deref(), &args, &config, &cgroup2)?;
    for note in fixed.flag_notes(&config, &cgroup2) {
        log::warn!("{note}");
    }
    let attach = fixed.attach.clone();
    let attach_path = cgroup2.abs(&attach);
    // The config first: a missing attach cgroup (exit 4) is retried by the unit until it
    // appears, and would hide a config error until then.
    config.check_scope(&attach)?;
    let (attach_dir, attach_id) = cgroup2.open_existing(&attach)?;
    let state = fixed.state.clone();
    let btf = Btf::from_sys_fs().map_err(|err| {
        Error::Kernel(format!(
            "{err}; keepalive needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (Linux 5.15+)"
        ))
    })?;
    if !btf.has_func("bpf_iter_tcp") {
        log::warn!(
            "{} lacks bpf_iter_tcp; existing connections will not be updated",
            btf::VMLINUX_BTF
        );
    }
    // Before the runtime directory is made: a refused state directory changes nothing.
    state.check_own()?;
    let _lock = instance::lock(&globals.runtime_dir, state.root())?;
    // A taken port fails here, before anything is made, loaded or attached. A second agent on
    // the same state (whose port it may well be) is refused as such: exit 7, not retried.
    let metrics_listener = match fixed.metrics.map(metrics::listen).transpose() {
        Ok(listener) => listener,
        Err(_) if state.is_locked() => return Err(state.held_elsewhere()),
        Err(err) => return Err(err),
    };
    if let Some(addr) = fixed.metrics {
        log::info!("serving metrics on http://{addr}/metrics");
    }
    // From here on a start makes things: a SIGTERM or SIGINT is caught, and ends the start at
    // the next step that can undo what it made (a fresh start's maps pinned with no program
    // attached would otherwise stay until the next start), or, once attached, as a stop.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (created, mut state_lock) = state.create_locked()?;
    let mut pinned = loader::pinned_sockops_link(&state)?;
    if let Some(link) = pinned.filter(|link| link.cgroup_id != attach_id) {
        match loader::link_cgroup(&link, &cgroup2) {
            Ok(Some(where_)) => {
                return Err(Error::Agent(format!(
                    "enforcement pinned in {} is attached to {where_}, not {attach}; run \
                     `{}` first to move it, or start with --cgroup {where_}",
                    state.root().display(),
                    state.detach_command()
                ))
                .into());
            }
            // It may still enforce there: moving it is as much the operator's decision.
            Err(err) => {
                return Err(Error::Agent(format!(
                    "enforcement pinned in {} is attached to cgroup id {}, not {attach}, and \
                     that cgroup could not be located to tell whether it still exists ({err}); \
                     run `{}` first to move it",
                    state.root().display(),
                    link.cgroup_id,
                    state.detach_command()
                ))
                .into());
            }
            Ok(None) => {
                log::warn!(
                    "the cgroup of the enforcement pinned in {} was removed, so it no longer \
                     covered new connections; attaching anew to {attach}",
                    state.root().display()
                );
                loader::unpin_defunct_links(&state)?;
                pinned = None;
            }
        }
    }
    if let Err(err) =
        refuse_foreign_enforcement(&cgroup2, &attach, &state, pinned.map(|link| link.prog_id))
    {
        if created {
            state.remove_unused();
        }
        return Err(err);
    }
    // A fresh start that failed after it attached the lock program left that link without
    // the sock_ops one, so nothing above saw where it is. Swapping the program in place would
    // keep it there, holding nothing this agent enforces: it is unpinned (which detaches it),
    // and attached here anew when a policy uses lock.
    let lock_link = state.lock_link();
    if let Some(link) = loader::pinned_link(&lock_link)?.filter(|link| link.cgroup_id != attach_id)
    {
        log::warn!(
            "the setsockopt program (lock mode) pinned at {}, left by a start that did not \
             finish, is attached to {}, not {attach}; detached it from there",
            lock_link.display(),
            match loader::link_cgroup(&link, &cgroup2) {
                Ok(Some(path)) => path.to_string(),
                Ok(None) => "a removed cgroup".to_owned(),
                Err(err) => format!("cgroup id {} ({err})", link.cgroup_id),
            }
        );
        pin::unpin(&lock_link)?;
    }

    if let Some(stop) = stop_requested(&mut term, &mut int).await {
        stopped_while_starting(stop, &state, created);
        return Ok(());
    }
    let loaded = Enforcer::load(
        &LoadOptions {
            state: &state,
            attach_dir: &attach_dir,
            attach_id,
            max_tracked_cgroups: fixed.max_tracked_cgroups,
            max_tracked_sockets: fixed.max_tracked_sockets,
            bpf_log_level: bpf_log_level(),
        },
        &btf,
    );
    // Nothing is attached yet: a fresh start that failed leaves no maps behind, which would
    // keep the sizes it failed with at the next start.
    let mut enforcer = match loaded {
        Ok(enforcer) => enforcer,
        Err(err) => {
            if created {
                state.remove_unused();
            }
            return Err(err);
        }
    };
    match enforcer.forget_removed_cgroups(&cgroup2, &attach) {
        Ok(0) => {}
        Ok(forgotten) => {
            log::info!("dropped the counters of {forgotten} cgroup(s) removed since the last run");
        }
        // Only `status` rows of removed cgroups stay; the next start drops them.
        Err(err) => log::warn!("{err:#}; kept the counters of every cgroup"),
    }
    // Kernel BTF is only needed while loading; give its memory back before settling in.
    drop(btf);
    release_free_memory();
    if let Some(logger) = enforcer.take_logger() {
        // SAFETY: the logger owns its ring buffer fd until the AsyncFd is dropped.
        let mut logger = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        }
        .map_err(|err| anyhow::anyhow!("failed to watch the BPF log buffer: {err}"))?;
        tokio::spawn(async move {
            while let Ok(mut guard) = logger.readable_mut().await {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
    }
    let mut daemon = Daemon {
        cgroup2: cgroup2.clone(),
        args: args.clone(),
        cli_state: globals.state_dir.clone(),
        fixed,
        config,
        runtime: Vec::new(),
        enforcer,
        resolution: Resolution::default(),
        table: Vec::new(),
        lock_attached: false,
        lock_stuck: false,
        apply_pending: false,
        pass_scheduled: false,
        retry_at: None,
        failures: 0,
        pass_failures: 0,
        last_pass: None,
        new_cgroups: NewCgroups::default(),
        watchdog: Watchdog::from_env(),
    };
    // Watch before resolving, so no cgroup created from here on is missed. The attach cgroup
    // was looked up by name a while ago (BTF, the state directory's lock and the load came
    // since): one removed meanwhile, and maybe made again under its name (a restarted
    // service's), is found out now that its removal from here on would be seen, and before
    // anything is pushed or attached. Exit 4, as at a removal later on; a fresh start leaves
    // nothing behind.
    let removed_while_starting = || {
        if created {
            state.remove_unused();
        }
        anyhow::Error::new(Error::CgroupNotFound(attach_path.clone())).context(format!(
            "the attach cgroup {attach} was removed while the agent started"
        ))
    };
    let mut watcher = match Follower::new(&cgroup2, &attach, attach_id, retry_wait) {
        Ok(watcher) => watcher,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(removed_while_starting());
        }
        Err(err) => {
            if created {
                state.remove_unused();
            }
            return Err(watch_failed(
                &attach,
                err,
                "failed to watch cgroups with inotify",
            ));
        }
    };
    if cgroup2.id(&attach).ok() != Some(attach_id) {
        return Err(removed_while_starting());
    }
    log::debug!("watching {} cgroups below {attach}", watcher.len());
    if let Some(stop) = stop_requested(&mut term, &mut int).await {
        stopped_while_starting(stop, &state, created);
        return Ok(());
    }
    let updated = match start_enforcing(&mut daemon, &attach, attach_id) {
        Ok(updated) => updated,
        // The kernel attaches nothing to a removed cgroup (ENOENT): a removal since the check
        // above is not the kernel's failure (exit 6, which the unit would not retry) but a
        // removal at start (exit 4).
        Err(_) if cgroup2.id(&attach).ok() != Some(attach_id) => {
            return Err(removed_while_starting());
        }
        Err(err) => {
            // As for a failed load: a fresh start leaves nothing behind, neither the maps
            // (whose sizes the next start would keep) nor a link it attached.
            if created {
                state.remove_unused();
            }
            return Err(err);
        }
    };
    if updated {
        log::info!(
            "took over pinned enforcement on {attach}: replaced the program in place ({})",
            state.root().display()
        );
    } else {
        log::info!("attached to {attach}; pinned in {}", state.root().display());
    }
    let mut pin_watch = PinWatch::new(&state, retry_wait);
    log::info!(
        "policy: default {} plus {}{}",
        describe_spec(&daemon.policy_set().default),
        counted(
            daemon.resolution.entries.len() as u64,
            "cgroup policy",
            "cgroup policies"
        ),
        match &daemon.config.file {
            Some(file) => format!(" from {}", file.display()),
            None => format!(
                " (there is no config file: {} does not exist, so the built-in default \
                 applies{})",
                config::DEFAULT_CONFIG,
                match daemon.config.policies.default_source {
                    Source::CommandLine => ", with run's flags",
                    _ => "",
                }
            ),
        }
    );
    for warning in daemon.config_warnings() {
        log::warn!("{warning}");
    }
    for warning in daemon.shadowed_globs() {
        log::warn!("{warning}");
    }
    // Existing connections get the table now; cgroups that changed since it was resolved are
    // already queued by the watcher and handled by the loop below. New connections get it
    // from the program already, so a pass that fails is tried again as later ones are, rather
    // than ending the start.
    if let Err(err) = daemon.apply() {
        daemon.pass_failed(&err, " at start");
    }
    release_free_memory();

    let mut control = control::bind(&globals.runtime_dir)?;
    // Clients are served on tasks of their own; only their requests come to this loop.
    let (requests_tx, mut requests) = tokio::sync::mpsc::channel::<control::Pending>(16);
    let state_root = state.root().to_owned();
    let waiting = daemon.watchdog.clients();
    if let Err(err) = control.share(&waiting) {
        log::warn!("{err:#}; clients that connect during a pass get no sign of progress");
    }
    let serve = |stream: tokio::net::UnixStream| {
        // Listed now: a pass may run before its task does.
        let added = waiting.add(&stream);
        let state_dir = state_root.clone();
        let requests = requests_tx.clone();
        tokio::spawn(async move {
            if let Err(err) = control::serve_one(stream, added, &state_dir, requests).await {
                log::warn!("control request failed: {err:#}");
            }
        });
    };
    if let Some(listener) = metrics_listener {
        metrics::spawn(listener, state.clone(), cgroup2.clone())?;
    }

    let watchdog = daemon.watchdog.period;
    let mut watchdog_tick =
        tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600 * 24 * 365)));
    // What the unit's status says of following cgroups, updated as it changes.
    let mut following = watcher.following();
    // The last failure to drop removed cgroups' counters, warned about once.
    let mut forget_failed: Option<String> = None;
    daemon.watchdog.started();
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&enforcing_status(&attach, following)),
    ]);
    log::info!("ready");

    loop {
        // Those a pass took in (see `control::Waiting::take_in`).
        for stream in waiting.taken() {
            match stream
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixStream::from_std(stream))
            {
                Ok(stream) => serve(stream),
                Err(err) => log::warn!("control request failed: {err}"),
            }
        }
        let due = daemon.due();
        let may_watch_pins = watcher.following() == Following::All;
        tokio::select! {
            _ = hup.recv() => {
                // Like every notification here, best effort: a clock that cannot be read ends
                // no reload, and no agent.
                let mut reloading = vec![sd_notify::NotifyState::Reloading];
                reloading.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
                let _ = sd_notify::notify(&reloading);
                daemon.watchdog.wait_begins();
                match daemon.reload() {
                    Ok((message, _)) => log_outcome(&message),
                    Err(err) => {
                        log::error!("rejected the reload on SIGHUP{}: {err:#}", what_stays(&err));
                    }
                }
                daemon.watchdog.wait_ends();
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            stream = control.accept() => serve(stream),
            Some(pending) = requests.recv() => {
                if pending.client_left() {
                    log::info!("skipped `{}`: its client left before its turn", pending.request);
                } else {
                    // `systemctl reload` (ExecReload=) and the client wait on its pass.
                    let (request, reply) = pending.split();
                    daemon.watchdog.wait_begins();
                    let response = daemon.handle(request);
                    daemon.watchdog.wait_ends();
                    // The client may go while it runs; its task logs that.
                    let _ = reply.send(response);
                }
            }
            changes = watcher.changes() => {
                let changes = match changes {
                    Ok(changes) => changes,
                    Err(err) => {
                        // As at a stop: the pins are all that keeps enforcement from here on.
                        daemon.restore_pins(&mut state_lock, &mut pin_watch, true);
                        log_what_stays(&state, &attach);
                        return Err(watch_failed(&attach, err, "inotify failed"));
                    }
                };
                if changes.root_removed {
                    // Exit 4, as for a missing cgroup at start: the unit retries until it is
                    // back, and the next start attaches anew.
                    return Err(anyhow::Error::new(Error::CgroupNotFound(attach_path)).context(
                        format!("the attach cgroup {attach} was removed; enforcement ended with it"),
                    ));
                }
                daemon.enforcer.forget_cgroups(&changes.removed);
                if watcher.following() != following {
                    following = watcher.following();
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(
                        &enforcing_status(&attach, following),
                    )]);
                }
                if changes.unseen {
                    // Cgroups removed while nothing watched them were not reported. While
                    // inotify is short this comes at every try: the same failure (a cgroup
                    // root may not list) is worth one warning.
                    match daemon.enforcer.forget_removed_cgroups(&cgroup2, &attach) {
                        Ok(_) => forget_failed = None,
                        Err(err) => {
                            let text = format!("{err:#}");
                            if forget_failed.as_ref() == Some(&text) {
                                log::debug!("still failing to drop the counters of removed cgroups: {text}");
                            } else {
                                log::warn!("failed to drop the counters of removed cgroups: {text}");
                            }
                            forget_failed = Some(text);
                        }
                    }
                }
                if let Err(err) = daemon.follow_cgroups() {
                    let wait = daemon.retry_later();
                    log::error!(
                        "failed to follow cgroup changes: {err:#}; trying again in {}",
                        humantime::format_duration(wait)
                    );
                }
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now).into()), if due.is_some() => {
                daemon.run_due();
            }
            () = pin_watch.removed(may_watch_pins) => {
                daemon.restore_pins(&mut state_lock, &mut pin_watch, false);
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => daemon.watchdog.ping(),
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    // Whatever went without inotify seeing it: the pins are all that keeps enforcement now.
    daemon.restore_pins(&mut state_lock, &mut pin_watch, true);
    log_what_stays(&state, &attach);
    Ok(())
}

/// The name of a SIGTERM or SIGINT that came since the handlers were installed, without
/// waiting for one.
async fn stop_requested(term: &mut Signal, int: &mut Signal) -> Option<&'static str> {
    // Signals reach their streams through the runtime's driver, which runs only when this
    // task gives the runtime a turn.
    tokio::task::yield_now().await;
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if term.poll_recv(&mut cx).is_ready() {
        Some("SIGTERM")
    } else if int.poll_recv(&mut cx).is_ready() {
        Some("SIGINT")
    } else {
        None
    }
}

/// Ends a start that a signal stopped before anything was attached: a fresh start takes back
/// what it made; pinned enforcement from an earlier run stays as it was.
fn stopped_while_starting(signal: &str, state: &StateDir, created: bool) {
    if created {
        state.remove_unused();
        log::info!("stopped by {signal} while starting; nothing was attached");
    } else {
        log::info!(
            "stopped by {signal} while starting; the enforcement pinned in {} stays as it was",
            state.root().display()
        );
    }
}

/// Resolves the policies, pushes their table, attaches the programs to the attach cgroup
/// `attach` (whose id is `attach_id`), or takes over those pinned, and pins the status
/// iterator; whether it took over.
fn start_enforcing(
    daemon: &mut Daemon,
    attach: &CgroupPath,
    attach_id: u64,
) -> anyhow::Result<bool> {
    // The table goes in before the program is attached, so the program never runs without it.
    let set = daemon.policy_set();
    let present = daemon.cgroup2.readable_ids(attach)?;
    let resolution = set.resolve(&daemon.cgroup2, attach)?;
    daemon.table = resolution.table(&set.default, attach_id);
    let seen = daemon.enforcer.seen_cgroups().unwrap_or_else(|err| {
        log::warn!("{err:#}; cgroups created while no agent ran count as seen");
        0
    });
    daemon.new_cgroups = NewCgroups::new(present, &daemon.table, seen);
    daemon.keep_seen();
    // As in `refresh`: the lock program goes in before a table that uses lock (a pinned
    // program from the last run already reads the table), and out after one that does not.
    let lock = set.uses_lock();
    if lock {
        daemon.enforcer.set_lock(true)?;
    }
    let previous = daemon.enforcer.pinned_table();
    daemon
        .enforcer
        .push_table(&daemon.new_cgroups.mark(&daemon.table))?;
    match previous {
        Ok(Some(previous)) => {
            let (names, parents) = daemon.cgroup2.tree(attach);
            // Without what the previous agent had seen, every cgroup counts as seen.
            let seen = if seen == 0 { u64::MAX } else { seen };
            let ids = replaced(&previous, &daemon.table, &parents, seen);
            warn_replaced(&names, &ids);
        }
        Ok(None) => {}
        Err(err) => log::info!(
            "{err:#}: which policies of the previous agent this start replaced is not known"
        ),
    }
    daemon.lock_attached = lock;
    if !lock {
        // One a previous agent left.
        daemon.detach_lock();
    }
    warn_unreadable(&Resolution::default(), &resolution);
    daemon.resolution = resolution;
    let updated = daemon.enforcer.attach_sockops()?;
    daemon.enforcer.pin_status_iterator()?;
    Ok(updated)
}

/// Says, as the agent stops, whether enforcement stays: whether its link is pinned.
fn log_what_stays(state: &StateDir, attach: &CgroupPath) {
    if state.sockops_link().exists() {
        log::info!(
            "stopping; enforcement stays attached to {attach} ({}). `{}` removes it",
            state.root().display(),
            state.detach_command()
        );
    } else {
        log::error!("stopping; enforcement on {attach} ends with the agent");
    }
}

/// What a failure to watch the cgroups below `attach` ends the agent with: exit 3 when
/// `attach` or its parent may not be read, which the agent needs to watch the parent (that
/// alone tells it of the attach cgroup's removal); not retried, as the unit would load
/// everything again every few seconds, and a mode or a capability changes only by hand.
/// Exit 1 otherwise, with `context`.
fn watch_failed(attach: &CgroupPath, err: std::io::Error, context: &'static str) -> anyhow::Error {
    if err.kind() != std::io::ErrorKind::PermissionDenied {
        return anyhow::Error::new(err).context(context);
    }
    let parent = attach.split_last().map_or_else(
        || "the cgroup2 root".to_owned(),
        |(parent, _)| parent.to_string(),
    );
    Error::Permission(format!(
        "cannot watch {parent} or {attach} with inotify: {err}; the agent watches the attach \
         cgroup's parent to learn of its removal, which needs read access: give the agent \
         CAP_DAC_READ_SEARCH, or make both readable by it"
    ))
    .into()
}

/// The status the service manager shows for a running agent.
fn enforcing_status(attach: &CgroupPath, following: Following) -> String {
    match following {
        Following::All => format!("enforcing on {attach}"),
        Following::Partly => {
            format!("enforcing on {attach}; some new cgroups seen late: inotify watches ran short")
        }
        Following::Nothing => {
            format!("enforcing on {attach}; new cgroups seen late: inotify unavailable")
        }
    }
}

/// Returns freed heap memory to the kernel. Loading parses kernel BTF (megabytes of types) that
/// is dropped right after; without this, glibc would keep the pages and the idle agent's RSS
/// would carry them forever.
fn release_free_memory() {
    // SAFETY: malloc_trim only releases unused memory of glibc's allocator.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rejection_says_the_previous_policy_stays_only_when_it_was_put_back() {
        let code = crate::error::usage("idle = 0 is out of range");
        assert_eq!(what_stays(&code), ", the previous policies stay");
        let unrestored = crate::error::usage("idle = 0 is out of range").context(NotRestored);
        assert_eq!(what_stays(&unrestored), "");
        // The answer says so, and keeps the rejection's exit code.
        let text = format!("{unrestored:#}");
        assert!(
            text.contains("may hold the rejected one")
                && text.ends_with("idle = 0 is out of range"),
            "{text}"
        );
        assert_eq!(
            crate::error::code_of(&unrestored),
            Some(crate::error::exit::USAGE)
        );
    }

    fn policy(mode: u32) -> Policy {
        Policy {
            idle: 60,
            interval: 10,
            count: 5,
            mode,
            ..Policy::default()
        }
    }

    fn marked(new: &NewCgroups, table: &[(u64, Policy)]) -> Vec<u64> {
        new.mark(table)
            .iter()
            .filter(|(_, p)| p.flags & policy_flags::NEW_CGROUP != 0)
            .map(|(id, _)| *id)
            .collect()
    }

    #[test]
    fn a_reload_warns_only_about_what_a_restart_would_change() {
        let running = Fixed {
            attach: CgroupPath::root(),
            state: StateDir::resolve(None, || None),
            metrics: None,
            max_tracked_cgroups: None,
            max_tracked_sockets: Some(4096),
        };
        // Spelling out a default changes nothing.
        let same = Fixed {
            max_tracked_cgroups: Some(DEFAULT_MAX_TRACKED_CGROUPS),
            ..running.clone()
        };
        assert_eq!(running.changes(&same), Vec::<String>::new());
        let moved = Fixed {
            attach: CgroupPath::root().join("system.slice"),
            max_tracked_sockets: None,
            ..running.clone()
        };
        let notes = running.changes(&moved);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(
            notes[0].starts_with("attach changed in the config (/ -> /system.slice)")
                && notes[0].contains("detach"),
            "{notes:?}"
        );
        assert!(
            notes[1].starts_with(&format!(
                "max_tracked_sockets changed in the config (4096 -> {DEFAULT_MAX_TRACKED_SOCKETS})"
            )),
            "{notes:?}"
        );
        // The detach it asks for names the running state directory: the config no longer does.
        let elsewhere = Fixed {
            state: StateDir::new("/sys/fs/bpf/elsewhere"),
            ..running.clone()
        };
        let notes = running.changes(&elsewhere);
        assert!(
            notes.len() == 1
                && notes[0].contains(&format!(
                    "`keepalive-agent --state-dir {} detach`",
                    pin::DEFAULT_STATE_DIR
                )),
            "{notes:?}"
        );
    }

    #[test]
    fn off_cgroups_that_appear_are_marked_until_a_pass_ran() {
        let mut new = NewCgroups::new(HashSet::from([1]), &[(2, policy(mode::OFF))], 0);
        // 2 existed at start: becoming `off` keeps the usual behaviour.
        let table = [(1, policy(mode::ENFORCE)), (2, policy(mode::OFF))];
        new.update(HashSet::from([1, 2]), &table);
        assert_eq!(marked(&new, &table), Vec::<u64>::new());
        // 3 and 4 appear, `off` and `fill`; 5 appears without a policy of its own.
        let table = [
            (1, policy(mode::ENFORCE)),
            (2, policy(mode::OFF)),
            (3, policy(mode::OFF)),
            (4, policy(mode::FILL)),
        ];
        new.update(HashSet::from([1, 2, 3, 4, 5]), &table);
        assert_eq!(marked(&new, &table), [3]);
        // Another look before a pass ran (a failed push, or `policy set`): still marked.
        new.update(HashSet::from([1, 2, 3, 4, 5]), &table);
        assert_eq!(marked(&new, &table), [3]);
        new.passed();
        assert_eq!(marked(&new, &table), Vec::<u64>::new());
        // 5 was seen before it became `off`: its sockets got the policy meant for them.
        let table = [(5, policy(mode::OFF))];
        new.update(HashSet::from([1, 2, 3, 4, 5]), &table);
        assert_eq!(marked(&new, &table), Vec::<u64>::new());
    }

    #[test]
    fn tries_after_failures_wait_longer_up_to_a_limit() {
        let waits: Vec<u64> = (0..8).map(|n| retry_wait(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(retry_wait(u32::MAX), RETRY_MAX);
    }

    #[test]
    fn off_cgroups_created_while_no_agent_ran_are_new_at_start() {
        // The last agent had seen cgroups up to id 10; 12 and 14 came while none ran.
        let table = [
            (10, policy(mode::OFF)),
            (12, policy(mode::OFF)),
            (14, policy(mode::ENFORCE)),
        ];
        let present = HashSet::from([9, 10, 12, 14]);
        let mut new = NewCgroups::new(present.clone(), &table, 10);
        assert_eq!(marked(&new, &table), [12]);
        // A start before the pass ran must find 12 new again, and 14 with it.
        assert_eq!(new.seen(), 11);
        new.passed();
        assert_eq!(new.seen(), 14);
        // An `off` cgroup older than the kept mark (one root could not read until now, say)
        // does not take the mark down with it: the cgroups that agent saw stay seen.
        let mut older = NewCgroups::new(HashSet::from([3]), &[], 10);
        older.update(HashSet::from([3, 5]), &[(5, policy(mode::OFF))]);
        assert_eq!(marked(&older, &[(5, policy(mode::OFF))]), [5]);
        assert_eq!(older.seen(), 10);
        // No agent kept what it saw: every cgroup there at start counts as seen.
        let new = NewCgroups::new(present, &table, 0);
        assert_eq!(marked(&new, &table), Vec::<u64>::new());
        assert_eq!(new.seen(), 14);
    }
}
