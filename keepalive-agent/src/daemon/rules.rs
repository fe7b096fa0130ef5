//! The agent's rules as `policy` commands and reloads change them: `policy set`, `unset`,
//! `list` and `reload` against the config, made whole or not at all, and the warnings their
//! answers carry about what other rules leave of a change.

use std::collections::HashSet;
use std::time::Duration;

use super::{Daemon, Fixed, describe_spec, log_outcome, overrides_from, what_stays};
use crate::{
    apply::ApplyReport,
    cgroup::CgroupPath,
    config,
    control::{PolicyRow, Request, Response},
    error::{Error, usage},
    logging::counted,
    policy::{self, Mode, Rule, Selector, Source, Spec},
};

impl Daemon {
    /// `policy reload` and SIGHUP: reads the config again and takes it up whole, or rejects
    /// it and keeps the policies in force. Runtime changes end with it; the answer names them,
    /// and warns about what in the new file applies nowhere.
    pub(super) fn reload(&mut self) -> anyhow::Result<(String, Option<ApplyReport>)> {
        let (mut message, report) = self.transact(|daemon| {
            let mut config = config::reload(
                daemon.args.config.as_deref(),
                daemon.config.file.as_deref(),
                &daemon.cgroup2,
            )?;
            let overridden = config.apply_overrides(&overrides_from(&daemon.args));
            let next = Fixed::resolve(
                daemon.cli_state.as_deref(),
                &daemon.args,
                &config,
                &daemon.cgroup2,
            )?;
            let notes = daemon.fixed.changes(&next);
            let flagged = next.flag_notes(&config, &daemon.cgroup2);
            // Policies moved along with `attach` fall outside the running one: say why, and
            // what moving enforcement takes, not only which policy is out of scope.
            if let Err(err) = config.check_scope(&daemon.fixed.attach) {
                return Err(
                    match notes.iter().find(|note| note.starts_with("attach ")) {
                        Some(note) => err.context(format!(
                            "{note}; until then the policies must stay within {}",
                            daemon.fixed.attach
                        )),
                        None => err,
                    },
                );
            }
            // A reload cannot move enforcement, and a start with this file would refuse to
            // (exit 7, which the unit does not retry): the file is rejected as a whole, as one
            // with an error is, rather than half taken up now and refused at the next start.
            let moves: Vec<&str> = notes
                .iter()
                .map(String::as_str)
                .filter(|note| note.starts_with("attach ") || note.starts_with("state_dir "))
                .collect();
            if let Some(first) = moves.first() {
                let reason = format!(
                    "{}; the reload is rejected, as a start with this file would be",
                    moves.join("; ")
                );
                // The line of the first change named, where the file has one (a setting
                // removed from it has none).
                let line = if first.starts_with("attach ") {
                    config.attach.as_ref().map(|(_, line)| *line)
                } else {
                    next.state.line()
                };
                return Err(match &config.file {
                    Some(file) => Error::Config {
                        file: file.clone(),
                        line,
                        reason,
                    },
                    None => Error::Usage(reason),
                }
                .into());
            }
            daemon.config = config;
            // Runtime changes last until a reload, as documented; say which this one ends, so
            // a routine reload (config management's SIGHUP, say) does not end an emergency
            // `policy set … --mode off` unnoticed.
            let dropped = daemon.runtime.drain(..).map(|rule| match &rule.spec {
                Some(spec) => format!(
                    "dropped the runtime policy for {} ({})",
                    rule.selector.text(),
                    describe_spec(spec)
                ),
                None => format!(
                    "{} follows the config again (its `policy unset` ended with the reload)",
                    rule.selector.text()
                ),
            });
            let dropped: Vec<String> = dropped.collect();
            let mut message = match &daemon.config.file {
                Some(file) => format!("reloaded the config {}", file.display()),
                None => format!(
                    "reloaded the config: there is none ({} does not exist), so the built-in \
                     default applies, with run's flags",
                    config::DEFAULT_CONFIG
                ),
            };
            for note in notes
                .into_iter()
                .chain(flagged)
                .chain(overridden)
                .chain(dropped)
                .chain(daemon.config_warnings())
            {
                message.push_str(&format!("\nwarning: {note}"));
            }
            Ok(message)
        })?;
        for warning in self.shadowed_globs() {
            message.push_str(&format!("\nwarning: {warning}"));
        }
        Ok((message, report))
    }

    /// The policy a `policy set` of `req` asks for. It changes `base`, the selector's current
    /// policy with the values it sets itself, where it has one: values and mode not given stay
    /// as they are, as `systemctl set-property` leaves other properties. Without one they
    /// come from the default, as in a `[[policy]]`.
    fn spec_from_request(
        &self,
        req: &Request,
        base: Option<(&Spec, policy::OwnValues)>,
    ) -> anyhow::Result<(Spec, policy::OwnValues)> {
        let Request::Set {
            idle,
            interval,
            count,
            user_timeout_ms,
            mode,
            ..
        } = req
        else {
            unreachable!("only called for set");
        };
        let given = own_values(req);
        let (mut spec, mut own, whose) = match base {
            Some((spec, own)) => (*spec, own, "its current policy"),
            None => (
                self.config.policies.default,
                policy::OwnValues::default(),
                "the default policy",
            ),
        };
        match mode {
            Some(mode) => spec.mode = mode.parse::<Mode>().map_err(usage)?,
            None if spec.mode == Mode::Off && given.first().is_some() => {
                return Err(usage(format!(
                    "values but no --mode, and the mode {whose} has is off: they would enforce \
                     nothing; add --mode enforce (or fill or lock)"
                )));
            }
            None => {}
        }
        own.idle |= given.idle;
        own.interval |= given.interval;
        own.count |= given.count;
        own.user_timeout |= given.user_timeout;
        if let Some(idle) = idle {
            spec.values.idle = policy::check_secs(
                "idle",
                Duration::from_secs(u64::from(*idle)),
                policy::limits::IDLE,
            )
            .map_err(usage)?;
        }
        if let Some(interval) = interval {
            spec.values.interval = policy::check_secs(
                "interval",
                Duration::from_secs(u64::from(*interval)),
                policy::limits::INTERVAL,
            )
            .map_err(usage)?;
        }
        if let Some(count) = count {
            spec.values.count = policy::check_count("count", i64::from(*count)).map_err(usage)?;
        }
        if let Some(ms) = user_timeout_ms {
            spec.values.user_timeout_ms =
                policy::check_user_timeout("user-timeout", Duration::from_millis(u64::from(*ms)))
                    .map_err(usage)?;
        }
        Ok((spec, own))
    }

    /// What a `policy set` of `selector` starts from, and where that came from: the policy of
    /// its own rule (runtime, else the config's), with the values that rule sets itself; for
    /// a path without one (or whose one a mask took away), the policy it gets now, from a
    /// glob or the nearest ancestor with a policy, all of whose values it then keeps (they
    /// are not `[default]`'s to follow); else nothing, for the default.
    fn base_for(&self, selector: &Selector) -> Option<(Spec, policy::OwnValues, String)> {
        let text = selector.text();
        let rule = self
            .runtime
            .iter()
            .chain(&self.config.policies.rules)
            .find(|rule| rule.selector.text() == text);
        if let Some(Rule {
            spec: Some(spec),
            own,
            source,
            ..
        }) = rule
        {
            let whose = match source {
                Source::Config { .. } => format!("its policy at {source}"),
                _ => "its runtime policy".to_owned(),
            };
            return Some((*spec, *own, whose));
        }
        let Selector::Exact(path) = selector else {
            return None;
        };
        // By name rather than from the last resolution, which may predate the cgroup.
        let (at, rule, spec) = policy::rule_by_name(self.rules(), path, &self.fixed.attach)?;
        let all = policy::OwnValues {
            idle: true,
            interval: true,
            count: true,
            user_timeout: true,
        };
        let (selector, source) = (rule.selector.text(), &rule.source);
        let from = if at == *path {
            format!("the policy it gets now, for {selector} ({source})")
        } else {
            format!("the policy it gets now from {at}, for {selector} ({source})")
        };
        Some((spec, all, from))
    }

    /// Refuses a runtime rule for `text` that would select one more cgroup or glob than a
    /// config may hold: every change walks the file system for each rule, and a loop of
    /// `policy set` must not grow that without bound. Replacing or masking a runtime or config
    /// rule needs no room, nor does one for the attach cgroup itself, so a full config can
    /// still be overridden (`--mode off`, say); both are bounded. What is counted is what
    /// the limit is about, so the refusal never quotes more than the limit.
    fn room_for(&self, text: &str) -> anyhow::Result<()> {
        let max = keepalive_common::MAX_POLICIES as usize;
        let attach = self.fixed.attach.to_string();
        let selected: HashSet<String> = self
            .runtime
            .iter()
            .chain(&self.config.policies.rules)
            .map(|r| r.selector.text())
            .filter(|selected| *selected != attach)
            .collect();
        if selected.len() < max || selected.contains(text) || text == attach {
            return Ok(());
        }
        // With no runtime policy to take away, room is made in the file.
        let advice = if self.runtime.iter().any(|r| r.spec.is_some()) {
            "`policy unset` a runtime policy or `reload` to drop them all"
        } else {
            "make room in the config file and `reload`, or change a cgroup it names"
        };
        Err(usage(format!(
            "{text}: the config and runtime policies already select {} cgroups and globs \
             besides the attach cgroup, and at most {max} are supported; {advice}",
            selected.len()
        )))
    }

    /// `policy set`: adds or replaces a runtime rule.
    fn set_rule(&mut self, cgroup: &str, req: &Request) -> anyhow::Result<String> {
        let selector = Selector::parse(&self.cgroup2, cgroup)?;
        selector.check_reaches(&self.fixed.attach).map_err(usage)?;
        let text = selector.text();
        let base = self.base_for(&selector);
        let (spec, own) =
            self.spec_from_request(req, base.as_ref().map(|(spec, own, _)| (spec, *own)))?;
        self.room_for(&text)?;
        let mut message = format!("set {text}: {}", describe_spec(&spec));
        let given = own_values(req);
        // The latest runtime rule already, so not even its precedence over an overlapping
        // runtime glob changes.
        let unchanged = self.runtime.first().is_some_and(|rule| {
            rule.selector.text() == text && rule.spec == Some(spec) && rule.own == own
        });
        if unchanged {
            message.push_str(" (unchanged: its runtime policy was this already)");
        } else if !(given.idle && given.interval && given.count && given.user_timeout)
            || matches!(req, Request::Set { mode: None, .. })
        {
            let from = base.map_or_else(
                || "taken from [default]".to_owned(),
                |(_, _, whose)| format!("kept from {whose}"),
            );
            message.push_str(&format!(" (what was not given is {from})"));
        }
        if spec.mode == Mode::Off && given.first().is_some() {
            message.push_str(
                "\nwarning: an off policy sets nothing: the values given are kept for a later \
                 --mode",
            );
        }
        if let Some(why) = self.selects_nothing(&selector) {
            message.push_str(&format!(
                "\nwarning: {text} {why}; the policy applies when it does (check the path if \
                 it was meant for a cgroup that exists)"
            ));
        }
        // The latest change comes first: where it overlaps an older runtime glob, it is what
        // the operator asked for last.
        self.runtime.retain(|r| r.selector.text() != text);
        self.runtime.insert(
            0,
            Rule {
                selector,
                spec: Some(spec),
                own,
                source: Source::Runtime,
            },
        );
        Ok(message)
    }

    /// How many of the cgroups with a policy now got it from `selector`, and those it matches
    /// that got theirs from another rule (a path, which comes before a glob) or that a mask by
    /// path leaves without one.
    fn matched_entries(&self, selector: &Selector) -> (usize, Vec<&CgroupPath>) {
        let text = selector.text();
        let matched = self
            .resolution
            .entries
            .values()
            .filter(|entry| selector.matches(&entry.cgroup));
        let (won, others): (Vec<_>, Vec<_>) = matched.partition(|entry| entry.selector == text);
        // The mask of a path is no other rule's doing for the config's policy of that path:
        // `policy list` names it as masked.
        let masked = self
            .masked_paths()
            .filter(|path| selector.is_glob() && selector.matches(path));
        (
            won.len(),
            others
                .iter()
                .map(|entry| &entry.cgroup)
                .chain(masked)
                .collect(),
        )
    }

    /// The cgroups that exist and that a `policy unset` by path (a mask of the config's policy
    /// for them) leaves without a policy of their own: a path comes before a glob, so no glob
    /// reaches them either.
    fn masked_paths(&self) -> impl Iterator<Item = &CgroupPath> {
        self.runtime.iter().filter_map(|rule| match &rule.selector {
            Selector::Exact(path)
                if rule.spec.is_none() && self.selects_nothing(&rule.selector).is_none() =>
            {
                Some(path)
            }
            _ => None,
        })
    }

    /// Adds to the answer of a `policy set` of a glob the cgroups it matches that keep a
    /// policy of their own: an emergency `--mode off` for `/pods/*` that leaves one out must
    /// say so.
    fn note_passed_over(&self, cgroup: &str, mut message: String) -> String {
        let Ok(selector) = Selector::parse(&self.cgroup2, cgroup) else {
            return message;
        };
        if !selector.is_glob() {
            return message;
        }
        // Those it matches, and those below them with a policy of their own, where the
        // nearest policy applies.
        let text = selector.text();
        let others = by_path_first(self.resolution.entries.values().filter(|entry| {
            entry.selector != text
                && std::iter::successors(Some(entry.cgroup.clone()), |path| {
                    path.split_last().map(|(parent, _)| parent)
                })
                .any(|path| selector.matches(&path))
        }));
        if !others.is_empty() {
            let one = others.len() == 1;
            message.push_str(&format!(
                "\nwarning: {} it matches, or below one it matches, {} a policy of {} own (a \
                 path comes before a glob, and below a cgroup the nearest policy applies): {}; \
                 change {} by path with `policy set` or `policy unset`",
                counted(others.len() as u64, "cgroup", "cgroups"),
                if one { "keeps" } else { "keep" },
                if one { "its" } else { "their" },
                shown(&others),
                if one { "it" } else { "them" },
            ));
        }
        // Those a mask by path leaves without one: they inherit, not take the glob's.
        let masked: Vec<&CgroupPath> = self
            .masked_paths()
            .filter(|path| selector.matches(path))
            .collect();
        if !masked.is_empty() {
            let one = masked.len() == 1;
            message.push_str(&format!(
                "\nwarning: {} it matches {} unset by path until the next reload, so {} from \
                 {} nearest ancestor with a policy instead (a path comes before a glob): {}; \
                 change {} by path with `policy set`",
                counted(masked.len() as u64, "cgroup", "cgroups"),
                if one { "is" } else { "are" },
                if one { "it inherits" } else { "they inherit" },
                if one { "its" } else { "their" },
                shown(&masked),
                if one { "it" } else { "them" },
            ));
        }
        message
    }

    /// Why a selector selects no cgroup under the attach cgroup now, if it selects none.
    fn selects_nothing(&self, selector: &Selector) -> Option<String> {
        selector.selects_nothing(&self.cgroup2, &self.fixed.attach)
    }

    /// A warning for each policy of the config file that selects no cgroup now: a misspelt
    /// path would otherwise leave its cgroup on the default without a word.
    pub(super) fn config_warnings(&self) -> Vec<String> {
        self.config.pending(&self.cgroup2, &self.fixed.attach)
    }

    /// A warning for each glob of the config file that matches cgroups but decides none of
    /// them: each gets the policy of a path, or of a glob before it in the file, so this one's
    /// values apply nowhere, which a reordered file or a misplaced glob would otherwise do
    /// without a word. Read from the resolution, so only after it was made from this config.
    pub(super) fn shadowed_globs(&self) -> Vec<String> {
        self.config
            .policies
            .rules
            .iter()
            .filter(|rule| rule.selector.is_glob() && rule.spec.is_some())
            .filter_map(|rule| {
                let (won, others) = self.matched_entries(&rule.selector);
                (won == 0 && !others.is_empty()).then(|| {
                    format!(
                        "{} (policy at {}) decides no cgroup: each it matches gets the policy \
                         of its own path, or of a glob earlier in the file, as the first rule \
                         that selects a cgroup decides and a path comes before a glob: {}",
                        rule.selector.text(),
                        rule.source,
                        shown(&others)
                    )
                })
            })
            .collect()
    }

    /// `policy unset`: removes a runtime rule, or masks the config's policy for the cgroup.
    fn unset_rule(&mut self, cgroup: &str) -> anyhow::Result<String> {
        let selector = Selector::parse(&self.cgroup2, cgroup)?;
        let text = selector.text();
        if let Some(pos) = self.runtime.iter().position(|r| r.selector.text() == text) {
            // A mask stays: removing it would bring the config's policy back, so a retried
            // `unset` would undo the first one.
            if self.runtime[pos].spec.is_none() {
                return Err(usage(format!(
                    "{text} is already unset; its config policy stays masked until the next reload"
                )));
            }
            self.runtime.remove(pos);
            // What a path gets now: the config's policy for it can come back.
            let now = match &selector {
                Selector::Exact(path) => match self.rules().find(|r| r.selector.matches(path)) {
                    Some(rule) if rule.spec.is_some() => format!(
                        "; the policy for {} ({}) applies to it now",
                        rule.selector.text(),
                        rule.source
                    ),
                    _ => "; it inherits from its nearest ancestor with a policy".to_owned(),
                },
                Selector::Glob { .. } => String::new(),
            };
            return Ok(format!("removed the runtime policy for {text}{now}"));
        }
        // A mask outside the attach cgroup would be taken and do nothing.
        selector.check_reaches(&self.fixed.attach).map_err(usage)?;
        // A path that a masked glob decides has no policy to take away: a mask of it would
        // change nothing, and `policy list` would show it as one.
        if let Selector::Exact(path) = &selector
            && let Some(mask) = self
                .rules()
                .find(|r| r.selector.matches(path))
                .filter(|r| r.spec.is_none())
        {
            return Err(usage(format!(
                "{text} has no policy to unset: the config's policy for {} that selected it is \
                 unset already, until the next reload; `policy set {text}` gives it one",
                mask.selector.text()
            )));
        }
        // By name: whether the cgroup exists, or can be listed, does not matter.
        let covered = self.config.policies.rules.iter().any(|r| {
            r.selector.text() == text
                || match &selector {
                    Selector::Exact(path) => r.selector.matches(path),
                    Selector::Glob { .. } => false,
                }
        });
        if !covered {
            // `policy list` shows it with the policy of a runtime glob: name that.
            if let Selector::Exact(path) = &selector
                && let Some(glob) = self
                    .runtime
                    .iter()
                    .find(|r| r.spec.is_some() && r.selector.matches(path))
            {
                let glob = glob.selector.text();
                return Err(usage(format!(
                    "{text} has no policy of its own: it gets the runtime policy for {glob}; \
                     `policy unset {glob}` removes that"
                )));
            }
            return Err(usage(format!("no policy is set for {text}")));
        }
        self.room_for(&text)?;
        let message = if selector.is_glob() {
            format!(
                "the config's policy for {text} is unset until the next reload; the cgroups it \
                 matched inherit from their nearest ancestor with a policy, unless another rule \
                 selects them"
            )
        } else {
            format!(
                "{text} no longer has a policy of its own until the next reload; it inherits \
                 from its nearest ancestor"
            )
        };
        self.runtime.insert(
            0,
            Rule {
                selector,
                spec: None,
                own: policy::OwnValues::default(),
                source: Source::Runtime,
            },
        );
        Ok(message)
    }

    /// The rows of `policy list`, what selects no cgroup yet (`pending`), and the masks of
    /// cgroups that exist, whose config policy thus has no row.
    fn rows(&self) -> (Vec<PolicyRow>, Vec<String>, Vec<String>) {
        let policies = &self.config.policies;
        let row =
            |cgroup: String, id: u64, spec: &Spec, selector: String, source: &Source| PolicyRow {
                cgroup,
                cgroup_id: id,
                idle: spec.values.idle,
                interval: spec.values.interval,
                count: spec.values.count,
                user_timeout: spec.values.user_timeout_ms,
                mode: spec.mode.to_string(),
                selector,
                source: source.to_string(),
            };
        let mut rows = vec![row(
            "default".into(),
            0,
            &policies.default,
            "(everything else)".into(),
            &policies.default_source,
        )];
        for (id, entry) in &self.resolution.entries {
            rows.push(row(
                entry.cgroup.to_string(),
                *id,
                &entry.spec,
                entry.selector.clone(),
                &entry.source,
            ));
        }
        let mut seen = HashSet::new();
        let pending = self
            .rules()
            // A config rule that a runtime rule of the same text replaces or masks is no rule
            // in force: `policy list` names the mask, and the replacement has the rows.
            .filter(|rule| seen.insert(rule.selector.text()))
            .filter_map(|rule| {
                let why = self.selects_nothing(&rule.selector).or_else(|| {
                    let (won, others) = self.matched_entries(&rule.selector);
                    (won == 0 && !others.is_empty() && rule.spec.is_some()).then(|| {
                        "every cgroup it matches gets another rule's policy, or is unset by \
                         path: a path comes before a glob, a later runtime glob before an \
                         earlier one"
                            .to_owned()
                    })
                })?;
                // A mask (`policy unset` of a config policy) is no policy of its own.
                let what = match rule.spec {
                    Some(_) => rule.source.to_string(),
                    None => "unset at runtime until the next reload".into(),
                };
                Some(format!("{} ({what}; {why})", rule.selector.text()))
            })
            .collect();
        let masked = self
            .rules()
            .filter(|rule| rule.spec.is_none() && self.selects_nothing(&rule.selector).is_none())
            .map(|rule| {
                format!(
                    "{} (unset at runtime until the next reload: the config's policy for it \
                     does not apply)",
                    rule.selector.text()
                )
            })
            .collect();
        (rows, pending, masked)
    }

    pub(super) fn handle(&mut self, req: Request) -> Response {
        let result: anyhow::Result<(String, Option<ApplyReport>)> = match &req {
            Request::List => Ok((String::new(), None)),
            Request::Reload => self.reload(),
            Request::Set { cgroup, .. } => self
                .transact(|daemon| daemon.set_rule(cgroup, &req))
                .map(|(message, applied)| (self.note_passed_over(cgroup, message), applied)),
            Request::Unset { cgroup } => self.transact(|daemon| daemon.unset_rule(cgroup)),
        };
        match result {
            Ok((message, applied)) => {
                let (policies, pending, masked) = self.rows();
                log_outcome(&message);
                Response {
                    ok: true,
                    message: (!message.is_empty()).then_some(message),
                    policies: Some(policies),
                    pending: (!pending.is_empty()).then_some(pending),
                    masked: (!masked.is_empty()).then_some(masked),
                    applied,
                    ..Response::default()
                }
            }
            Err(err) => {
                let stays = what_stays(&err);
                // A rejected reload leaves a file on disk that is not the one in force, and
                // that the next start refuses: an error, as for SIGHUP. Other refusals leave
                // nothing behind, and their client was told.
                let level = match req {
                    Request::Reload => log::Level::Error,
                    _ => log::Level::Warn,
                };
                log::log!(level, "rejected `{req}`{stays}: {err:#}");
                // The client says what stays too.
                let mut response = Response::failure(&err);
                if !stays.is_empty() {
                    response.error = response.error.map(|e| format!("{e} (rejected{stays})"));
                }
                response
            }
        }
    }
}

/// Which values a `policy set` request gave.
fn own_values(req: &Request) -> policy::OwnValues {
    match req {
        Request::Set {
            idle,
            interval,
            count,
            user_timeout_ms,
            ..
        } => policy::OwnValues {
            idle: idle.is_some(),
            interval: interval.is_some(),
            count: count.is_some(),
            user_timeout: user_timeout_ms.is_some(),
        },
        _ => policy::OwnValues::default(),
    }
}

/// The first few of `paths`, for a warning, and how many more there are.
fn shown(paths: &[&CgroupPath]) -> String {
    const SHOWN: usize = 5;
    let mut shown: Vec<String> = paths.iter().take(SHOWN).map(ToString::to_string).collect();
    if paths.len() > SHOWN {
        shown.push(format!("and {} more", paths.len() - SHOWN));
    }
    shown.join(", ")
}

/// The cgroups of `entries` in the order a warning names them: those with a policy by their
/// own path first, which an operator set for that cgroup alone and may have forgotten, then
/// those another glob gave one, each in cgroup id order. A warning names only the first few.
fn by_path_first<'a>(entries: impl Iterator<Item = &'a policy::Entry>) -> Vec<&'a CgroupPath> {
    let (by_path, by_glob): (Vec<_>, Vec<_>) =
        entries.partition(|entry| entry.selector == entry.cgroup.to_string());
    by_path
        .into_iter()
        .chain(by_glob)
        .map(|entry| &entry.cgroup)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_glob_s_warning_names_the_cgroups_with_a_policy_by_path_first() {
        let entry = |path: &str, selector: &str| policy::Entry {
            cgroup: CgroupPath::root().join("pods").join(path),
            spec: policy::BUILTIN_DEFAULT,
            selector: selector.to_owned(),
            source: policy::Source::Builtin,
        };
        let entries = [
            entry("a", "/pods/[ab]"),
            entry("b", "/pods/[ab]"),
            entry("c", "/pods/c"),
            entry("d", "/pods/[d-z]"),
            entry("e", "/pods/e"),
        ];
        let names: Vec<String> = by_path_first(entries.iter())
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            names,
            ["/pods/c", "/pods/e", "/pods/a", "/pods/b", "/pods/d"]
        );
    }
}
