//! The policy model: modes, values, rules, and their resolution to the cgroup ids the BPF
//! program looks up.
//!
//! A rule selects cgroups by exact path or by glob. Resolution takes the rules in precedence
//! order (exact paths before globs; within each, runtime rules, the latest first, before the
//! config's in file order); the first rule that selects a cgroup decides its policy. Cgroups without an entry inherit from their nearest
//! ancestor with one, in the kernel, at connection time.

use std::{
    collections::{BTreeMap, HashSet},
    fmt, fs, io,
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

use keepalive_common::{DEFAULT_POLICY_KEY, Policy, mode, policy_flags, uapi};
use serde::Serialize;

use crate::{
    cgroup::{Cgroup2, CgroupPath},
    error::usage,
};

/// What a policy does to the sockets it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The policy's values replace whatever the application set before the connection was
    /// established.
    Enforce,
    /// Sockets on which the application enabled SO_KEEPALIVE itself keep its values.
    Fill,
    /// Sockets are left alone.
    Off,
    /// Like enforce; later setsockopt calls cannot switch keepalive off or loosen it.
    Lock,
}

impl Mode {
    /// Every mode, for messages.
    pub const NAMES: &str = "enforce, fill, off, lock";

    /// The ABI value.
    pub const fn abi(self) -> u32 {
        match self {
            Self::Enforce => mode::ENFORCE,
            Self::Fill => mode::FILL,
            Self::Off => mode::OFF,
            Self::Lock => mode::LOCK,
        }
    }

    /// From the ABI value.
    pub const fn from_abi(value: u32) -> Option<Self> {
        match value {
            mode::ENFORCE => Some(Self::Enforce),
            mode::FILL => Some(Self::Fill),
            mode::OFF => Some(Self::Off),
            mode::LOCK => Some(Self::Lock),
            _ => None,
        }
    }

    /// The config spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Fill => "fill",
            Self::Off => "off",
            Self::Lock => "lock",
        }
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "enforce" => Ok(Self::Enforce),
            "fill" => Ok(Self::Fill),
            "off" => Ok(Self::Off),
            "lock" => Ok(Self::Lock),
            other => Err(format!(
                "unknown mode \"{other}\"; expected one of {}",
                Self::NAMES
            )),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Keepalive values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Values {
    /// Seconds of idleness before the first probe (TCP_KEEPIDLE), 1–32767.
    pub idle: u32,
    /// Seconds between probes (TCP_KEEPINTVL), 1–32767.
    pub interval: u32,
    /// Unanswered probes before the connection is dropped (TCP_KEEPCNT), 1–127.
    pub count: u32,
    /// TCP_USER_TIMEOUT in milliseconds; `None` leaves the kernel's behaviour.
    pub user_timeout_ms: Option<u32>,
}

/// A complete policy: mode and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    /// The mode.
    pub mode: Mode,
    /// The values (ignored by `off`).
    pub values: Values,
}

/// The built-in default: enforce idle 60 s, interval 10 s, count 5, kernel user timeout.
pub const BUILTIN_DEFAULT: Spec = Spec {
    mode: Mode::Enforce,
    values: Values {
        idle: 60,
        interval: 10,
        count: 5,
        user_timeout_ms: None,
    },
};

impl Spec {
    /// The record the BPF program reads.
    pub const fn abi(&self) -> Policy {
        let (user_timeout_ms, flags) = match self.values.user_timeout_ms {
            Some(ms) => (ms, policy_flags::USER_TIMEOUT),
            None => (0, 0),
        };
        Policy {
            idle: self.values.idle,
            interval: self.values.interval,
            count: self.values.count,
            user_timeout_ms,
            mode: self.mode.abi(),
            flags,
        }
    }
}

/// Range of each value, shared by flags, the config file and `policy set`.
pub mod limits {
    use super::uapi;

    /// TCP_KEEPIDLE range in seconds.
    pub const IDLE: std::ops::RangeInclusive<u32> = 1..=uapi::MAX_KEEPIDLE;
    /// TCP_KEEPINTVL range in seconds.
    pub const INTERVAL: std::ops::RangeInclusive<u32> = 1..=uapi::MAX_KEEPINTVL;
    /// TCP_KEEPCNT range.
    pub const COUNT: std::ops::RangeInclusive<u32> = 1..=uapi::MAX_KEEPCNT;
    /// TCP_USER_TIMEOUT range in milliseconds.
    pub const USER_TIMEOUT_MS: std::ops::RangeInclusive<u32> = 1..=uapi::MAX_USER_TIMEOUT_MS;
}

/// Parses a duration: a plain integer is seconds, otherwise humantime syntax (`90s`, `2m`,
/// `1500ms`, `1h 30m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if let Ok(secs) = trimmed.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    // Quoted as given: a blank one is named as blank, not as empty.
    humantime::parse_duration(trimmed).map_err(|err| {
        format!("{text:?} is not a duration ({err}); use seconds (90) or units (90s, 2m, 1500ms)")
    })
}

/// Checks a whole-seconds value against its range. `what` names the flag or key.
pub fn check_secs(
    what: &str,
    value: Duration,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, String> {
    if value.subsec_nanos() != 0 {
        return Err(format!(
            "{what} = {} is not a whole number of seconds; the kernel counts {what} in seconds",
            humantime::format_duration(value)
        ));
    }
    u32::try_from(value.as_secs())
        .ok()
        .filter(|secs| range.contains(secs))
        .ok_or_else(|| {
            // In units as well, where it has any: `1M` is a month, not a minute.
            let units = match value.as_secs() {
                0..60 => String::new(),
                _ => format!(" ({})", humantime::format_duration(value)),
            };
            format!(
                "{what} = {}{units} is out of range; accepted: {} to {} seconds",
                value.as_secs(),
                range.start(),
                range.end()
            )
        })
}

/// Checks a count against its range.
pub fn check_count(what: &str, value: i64) -> Result<u32, String> {
    u32::try_from(value)
        .ok()
        .filter(|v| limits::COUNT.contains(v))
        .ok_or_else(|| {
            format!(
                "{what} = {value} is out of range; accepted: {} to {}",
                limits::COUNT.start(),
                limits::COUNT.end()
            )
        })
}

/// Checks a user timeout against its range, returning milliseconds; 0 means none (the
/// kernel's behaviour), so a policy can drop a user timeout the default sets.
pub fn check_user_timeout(what: &str, value: Duration) -> Result<Option<u32>, String> {
    if value.is_zero() {
        return Ok(None);
    }
    if !value.subsec_nanos().is_multiple_of(1_000_000) {
        return Err(format!(
            "{what} = {} has sub-millisecond precision; TCP_USER_TIMEOUT is in milliseconds",
            humantime::format_duration(value)
        ));
    }
    u32::try_from(value.as_millis())
        .ok()
        .filter(|ms| limits::USER_TIMEOUT_MS.contains(ms))
        .map(Some)
        .ok_or_else(|| {
            format!(
                "{what} = {} is out of range; accepted: 0 (none) or 1ms to {}",
                humantime::format_duration(value),
                humantime::format_duration(Duration::from_millis(u64::from(
                    *limits::USER_TIMEOUT_MS.end()
                )))
            )
        })
}

/// Where a policy came from, shown by `policy list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The built-in default.
    Builtin,
    /// Command-line flags of `run`.
    CommandLine,
    /// A config file line.
    Config {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
    },
    /// `keepalive-agent policy set` / `unset`.
    Runtime,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Builtin => f.write_str("built-in"),
            Self::CommandLine => f.write_str("command line"),
            Self::Config { file, line } => write!(f, "{}:{line}", file.display()),
            Self::Runtime => f.write_str("runtime"),
        }
    }
}

/// Which cgroups a rule covers.
#[derive(Clone, Debug)]
pub enum Selector {
    /// One cgroup, which may not exist yet.
    Exact(CgroupPath),
    /// Every cgroup whose path matches, component by component (`*`, `?` and `[…]` match
    /// within one path component).
    Glob {
        /// The normalized pattern text, relative to the cgroup2 mount.
        text: String,
        /// One pattern per path component.
        components: Vec<glob::Pattern>,
    },
}

/// Whether each pattern matches the name at its position, as far as both go.
fn matches_pairwise(patterns: &[glob::Pattern], names: &[&str]) -> bool {
    patterns
        .iter()
        .zip(names)
        .all(|(pattern, name)| pattern.matches(name))
}

/// Refuses a path that names a file, or goes through one (`…/cgroup.procs`): no cgroup can
/// ever be there. A path that does not exist is fine; the cgroup may be created later.
pub(crate) fn check_not_a_file(cgroup2: &Cgroup2, path: &CgroupPath) -> anyhow::Result<()> {
    let abs = cgroup2.abs(path);
    let file = match fs::metadata(&abs) {
        Ok(meta) => !meta.is_dir(),
        Err(err) => err.kind() == io::ErrorKind::NotADirectory,
    };
    if file {
        return Err(usage(format!(
            "cgroup {path} is not a cgroup: {} is a file, not a directory",
            abs.display()
        )));
    }
    Ok(())
}

/// Whether a path component is a glob pattern.
pub(crate) fn is_glob(component: &str) -> bool {
    component.contains(['*', '?', '['])
}

/// For a glob that is also the path of a cgroup that exists (`x[1]`), how to select that
/// cgroup by name; else nothing.
fn literal_hint(cgroup2: &Cgroup2, path: &CgroupPath) -> String {
    if !cgroup2.abs(path).is_dir() {
        return String::new();
    }
    let escaped: String = path
        .as_str()
        .chars()
        .map(|c| match c {
            '*' | '?' | '[' => format!("[{c}]"),
            c => c.to_string(),
        })
        .collect();
    format!(
        " (a cgroup named {path} exists: `*`, `?` and `[` are glob characters, so select it \
         as /{escaped})"
    )
}

impl Selector {
    /// Parses a cgroup path or glob (absolute under the mount, or relative to it).
    pub fn parse(cgroup2: &Cgroup2, spec: &str) -> anyhow::Result<Self> {
        let path = cgroup2.parse(spec)?;
        if !path.components().any(is_glob) {
            check_not_a_file(cgroup2, &path)?;
            return Ok(Self::Exact(path));
        }
        let components = path
            .components()
            .map(|c| {
                glob::Pattern::new(c).map_err(|err| {
                    usage(format!(
                        "cgroup pattern {spec} is not a valid glob: in `{c}`, {err}{}",
                        literal_hint(cgroup2, &path)
                    ))
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self::Glob {
            text: path.as_str().to_owned(),
            components,
        })
    }

    /// As [`Selector::parse`], except that a path naming a cgroup that exists is that cgroup,
    /// also where its name holds glob characters (`x[1]`): for filters, which must take back
    /// the paths `status` prints. Policies keep to [`Selector::parse`], whose meaning does not
    /// change as cgroups come and go.
    pub fn parse_filter(cgroup2: &Cgroup2, spec: &str) -> anyhow::Result<Self> {
        let path = cgroup2.parse(spec)?;
        if path.components().any(is_glob) && cgroup2.abs(&path).is_dir() {
            return Ok(Self::Exact(path));
        }
        Self::parse(cgroup2, spec)
    }

    /// The selector as written (normalized), with a leading `/`.
    pub fn text(&self) -> String {
        match self {
            Self::Exact(path) => path.to_string(),
            Self::Glob { text, .. } => format!("/{text}"),
        }
    }

    /// Whether this is a glob.
    pub const fn is_glob(&self) -> bool {
        matches!(self, Self::Glob { .. })
    }

    /// Refuses, with the reason, a selector that can select neither `attach` nor cgroups inside
    /// it: a path must be one of them (an ancestor's policy would never reach a socket, since
    /// the program's walk stops at `attach`); a glob, which matches paths of exactly its own
    /// depth, must be at least as deep as `attach` and match each of its components.
    pub fn check_reaches(&self, attach: &CgroupPath) -> Result<(), String> {
        let reaches = match self {
            Self::Exact(path) => path.is_within(attach),
            Self::Glob { components, .. } => {
                let attach: Vec<&str> = attach.components().collect();
                components.len() >= attach.len() && matches_pairwise(components, &attach)
            }
        };
        if reaches {
            return Ok(());
        }
        Err(format!(
            "cgroup {} is outside the attach cgroup {attach}: policies apply only to it and the \
             cgroups below it",
            self.text()
        ))
    }

    /// Whether `path` is a cgroup this selector matches or one below it.
    pub fn covers(&self, path: &CgroupPath) -> bool {
        match self {
            Self::Exact(top) => path.is_within(top),
            Self::Glob { components, .. } => {
                let names: Vec<&str> = path.components().collect();
                names.len() >= components.len() && matches_pairwise(components, &names)
            }
        }
    }

    /// Whether this selector selects `path` itself (by name alone: the cgroup need not exist).
    pub fn matches(&self, path: &CgroupPath) -> bool {
        match self {
            Self::Exact(exact) => exact == path,
            Self::Glob { components, .. } => {
                let names: Vec<&str> = path.components().collect();
                names.len() == components.len() && matches_pairwise(components, &names)
            }
        }
    }

    /// Why this selector selects no cgroup within `attach` now, if it selects none: the cgroup
    /// does not exist (a typo looks like that), no cgroup matches, or one on the way cannot be
    /// read.
    pub fn selects_nothing(&self, cgroup2: &Cgroup2, attach: &CgroupPath) -> Option<String> {
        let mut unreadable = BTreeMap::new();
        let selected = self.expand_noting(cgroup2, &mut unreadable);
        if selected.iter().any(|(path, _)| path.is_within(attach)) {
            return None;
        }
        if let Some((dir, err)) = unreadable.iter().next() {
            return Some(format!(
                "is below {dir}, which the agent cannot read ({err})"
            ));
        }
        Some(match self {
            Self::Exact(_) => "does not exist yet".to_owned(),
            Self::Glob { text, .. } => format!(
                "matches no cgroup yet{}",
                literal_hint(cgroup2, &CgroupPath::root().join(text))
            ),
        })
    }

    /// The cgroups this selector matches now, noting in `unreadable` each cgroup on the way
    /// that exists but could not be read, with why: the cgroups it selects below it are missing.
    pub fn expand_noting(
        &self,
        cgroup2: &Cgroup2,
        unreadable: &mut BTreeMap<CgroupPath, io::Error>,
    ) -> Vec<(CgroupPath, u64)> {
        let parts: Vec<String> = match self {
            Self::Exact(path) => path.components().map(str::to_owned).collect(),
            Self::Glob { text, .. } => text.split('/').map(str::to_owned).collect(),
        };
        let mut level = vec![CgroupPath::root()];
        for (depth, part) in parts.iter().enumerate() {
            let mut next = Vec::new();
            for dir in &level {
                match self {
                    Self::Glob { components, .. } if is_glob(part) => {
                        match cgroup2.read_children(dir) {
                            Ok(children) => next.extend(
                                children
                                    .iter()
                                    .filter(|child| components[depth].matches(child))
                                    .map(|child| dir.join(child)),
                            ),
                            Err(err) => note(unreadable, dir, err),
                        }
                    }
                    _ => {
                        let child = dir.join(part);
                        match fs::metadata(cgroup2.abs(&child)) {
                            Ok(meta) if meta.is_dir() => next.push(child),
                            // Searching `dir` was refused: it is the one root may not read.
                            Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
                                note(unreadable, dir, err);
                            }
                            // Absent, or not a cgroup (a file, or a name too long for one).
                            _ => {}
                        }
                    }
                }
            }
            level = next;
        }
        level
            .into_iter()
            .filter_map(|path| cgroup2.id(&path).ok().map(|id| (path, id)))
            .collect()
    }
}

/// Notes that `dir` could not be read, keeping an error that is not a refused permission over
/// one that is: that one fails the resolution (see [`PolicySet::resolve`]).
fn note(unreadable: &mut BTreeMap<CgroupPath, io::Error>, dir: &CgroupPath, err: io::Error) {
    match unreadable.get(dir) {
        Some(noted) if noted.kind() != io::ErrorKind::PermissionDenied => {}
        _ => {
            unreadable.insert(dir.clone(), err);
        }
    }
}

/// A rule: a selector and what it sets. `None` masks lower-precedence rules for the selected
/// cgroups (the result of `policy unset` on a cgroup the config covers).
#[derive(Clone, Debug)]
pub struct Rule {
    /// The cgroups covered.
    pub selector: Selector,
    /// The policy, or `None` for "no policy of its own".
    pub spec: Option<Spec>,
    /// Which values the rule sets itself; the others come from the default.
    pub own: OwnValues,
    /// Where it came from.
    pub source: Source,
}

/// Which of a rule's values it sets itself (the rest follow the default, including
/// command-line overrides of it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnValues {
    /// `idle` was given.
    pub idle: bool,
    /// `interval` was given.
    pub interval: bool,
    /// `count` was given.
    pub count: bool,
    /// `user_timeout` was given.
    pub user_timeout: bool,
}

impl OwnValues {
    /// The config key of the first value given, if any.
    pub fn first(&self) -> Option<&'static str> {
        [
            ("idle", self.idle),
            ("interval", self.interval),
            ("count", self.count),
            ("user_timeout", self.user_timeout),
        ]
        .into_iter()
        .find_map(|(key, given)| given.then_some(key))
    }
}

/// The rule a cgroup at `path` gets its policy from, matched by name against `rules` (in
/// precedence order), with the cgroup it names: the first rule that selects `path` itself, or
/// where none does, or one masks it, its nearest ancestor's within `attach`, as the program
/// walks up. `None`: the default. By name, so the answer holds for a cgroup the last
/// resolution predates (created since, with inotify's news of it not yet taken in).
pub fn rule_by_name<'a>(
    rules: impl IntoIterator<Item = &'a Rule>,
    path: &CgroupPath,
    attach: &CgroupPath,
) -> Option<(CgroupPath, &'a Rule, Spec)> {
    let rules: Vec<&Rule> = rules.into_iter().collect();
    std::iter::successors(Some(path.clone()), |path| {
        path.split_last().map(|(parent, _)| parent)
    })
    .take_while(|path| path.is_within(attach))
    .find_map(|path| {
        let rule = *rules.iter().find(|rule| rule.selector.matches(&path))?;
        Some((path, rule, rule.spec?))
    })
}

/// The complete policy: the default and rules in precedence order.
#[derive(Clone, Debug)]
pub struct PolicySet {
    /// The `[default]` policy.
    pub default: Spec,
    /// Where the default came from.
    pub default_source: Source,
    /// Rules, highest precedence first.
    pub rules: Vec<Rule>,
}

/// One resolved table entry.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The cgroup.
    pub cgroup: CgroupPath,
    /// Its policy.
    pub spec: Spec,
    /// The rule's selector, for `policy list`.
    pub selector: String,
    /// Where the rule came from.
    pub source: Source,
}

/// A policy set resolved against the cgroups that exist now.
#[derive(Clone, Debug, Default)]
pub struct Resolution {
    /// cgroup id -> entry.
    pub entries: BTreeMap<u64, Entry>,
    /// Cgroups below the attach cgroup that root may not read, with the error: policies for
    /// cgroups below them are missing from `entries`.
    pub unreadable: BTreeMap<CgroupPath, String>,
}

impl Resolution {
    /// The table pushed to the kernel: the default under [`DEFAULT_POLICY_KEY`] and under the
    /// attach cgroup's id (unless it has a policy of its own), so the program's ancestor walk
    /// ends with a hit; and one entry per cgroup with a policy.
    pub fn table(&self, default: &Spec, attach_id: u64) -> Vec<(u64, Policy)> {
        let mut default = default.abi();
        default.flags |= policy_flags::DEFAULT;
        let mut table: Vec<(u64, Policy)> = std::iter::once((DEFAULT_POLICY_KEY, default))
            .chain(self.entries.iter().map(|(id, e)| (*id, e.spec.abi())))
            .collect();
        if !self.entries.contains_key(&attach_id) {
            table.push((attach_id, default));
        }
        table
    }
}

impl PolicySet {
    /// A set with only a default.
    pub const fn new(default: Spec, default_source: Source) -> Self {
        Self {
            default,
            default_source,
            rules: Vec::new(),
        }
    }

    /// Whether any policy uses `lock` (the lock program is attached only then). A rule that
    /// an earlier one for the same selector replaces or masks (a runtime rule over the
    /// config's) is not used.
    pub fn uses_lock(&self) -> bool {
        let mut seen = HashSet::new();
        self.default.mode == Mode::Lock
            || self.rules.iter().any(|rule| {
                seen.insert(rule.selector.text())
                    && rule.spec.is_some_and(|spec| spec.mode == Mode::Lock)
            })
    }

    /// Resolves the rules against the cgroups that exist now, ignoring cgroups outside
    /// `attach` (the program never sees their sockets).
    ///
    /// A cgroup root may not read (see [`Resolution::unreadable`]) stays so until someone
    /// changes it; any other error reading one (too many open files, say) may be gone at the
    /// next try, and fails the resolution rather than give a table without the policies
    /// below it.
    pub fn resolve(&self, cgroup2: &Cgroup2, attach: &CgroupPath) -> anyhow::Result<Resolution> {
        let mut resolution = Resolution::default();
        let mut claimed = HashSet::new();
        let mut unreadable = BTreeMap::new();
        for rule in &self.rules {
            for (path, id) in rule.selector.expand_noting(cgroup2, &mut unreadable) {
                if !path.is_within(attach) || !claimed.insert(id) {
                    continue;
                }
                if let Some(spec) = rule.spec {
                    resolution.entries.insert(
                        id,
                        Entry {
                            cgroup: path,
                            spec,
                            selector: rule.selector.text(),
                            source: rule.source.clone(),
                        },
                    );
                }
            }
        }
        for (path, err) in unreadable {
            // A glob can reach the attach cgroup's subtree through its ancestors.
            if !path.is_within(attach) && !attach.is_within(&path) {
                continue;
            }
            if err.kind() != io::ErrorKind::PermissionDenied {
                return Err(
                    anyhow::Error::new(err).context(format!("failed to read cgroup {path}"))
                );
            }
            resolution.unreadable.insert(path, err.to_string());
        }
        Ok(resolution)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(
            parse_duration("1500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(parse_duration("-5").is_err());
        assert!(
            parse_duration(" ")
                .unwrap_err()
                .starts_with("\" \" is not a duration")
        );
    }

    #[test]
    fn ranges_name_value_and_range() {
        assert_eq!(
            check_secs("idle", Duration::from_secs(30), limits::IDLE),
            Ok(30)
        );
        let err = check_secs("idle", Duration::from_secs(0), limits::IDLE).unwrap_err();
        assert!(
            err.contains("idle = 0") && err.contains("1 to 32767"),
            "{err}"
        );
        let err = check_secs("interval", Duration::from_secs(40000), limits::INTERVAL).unwrap_err();
        assert!(err.contains("40000") && err.contains("32767"), "{err}");
        let err = check_secs("idle", Duration::from_millis(1500), limits::IDLE).unwrap_err();
        assert!(err.contains("whole number of seconds"), "{err}");
        // `1M` is a month: the message says so in units, which a minute meant would not be.
        let month = parse_duration("1M").unwrap();
        let err = check_secs("idle", month, limits::IDLE).unwrap_err();
        assert!(
            err.starts_with("idle = 2630016 (1month) is out of range"),
            "{err}"
        );
        assert_eq!(check_count("count", 127), Ok(127));
        assert!(check_count("count", 128).unwrap_err().contains("1 to 127"));
        assert!(check_count("count", -1).is_err());
        assert_eq!(
            check_user_timeout("user_timeout", Duration::from_millis(1500)),
            Ok(Some(1500))
        );
        assert_eq!(check_user_timeout("user_timeout", Duration::ZERO), Ok(None));
        assert!(check_user_timeout("user_timeout", Duration::from_secs(1 << 31)).is_err());
    }

    #[test]
    fn modes_round_trip() {
        for mode in [Mode::Enforce, Mode::Fill, Mode::Off, Mode::Lock] {
            assert_eq!(mode.as_str().parse::<Mode>(), Ok(mode));
            assert_eq!(Mode::from_abi(mode.abi()), Some(mode));
        }
        assert!(
            "strict"
                .parse::<Mode>()
                .unwrap_err()
                .contains("enforce, fill, off, lock")
        );
    }

    #[test]
    fn selectors() {
        let cg = Cgroup2::at("/sys/fs/cgroup");
        let exact = Selector::parse(&cg, "system.slice/a.service").unwrap();
        assert!(!exact.is_glob());
        assert_eq!(exact.text(), "/system.slice/a.service");
        let glob = Selector::parse(&cg, "/sys/fs/cgroup/system.slice/docker-*.scope").unwrap();
        assert!(glob.is_glob());
        assert_eq!(glob.text(), "/system.slice/docker-*.scope");
        assert!(Selector::parse(&cg, "a/[").is_err());
    }

    #[test]
    fn selectors_cover_what_they_match_and_what_is_below_it() {
        let cg = Cgroup2::at("/sys/fs/cgroup");
        let path = |p: &str| cg.parse(p).unwrap();
        let glob = Selector::parse(&cg, "kubepods/pod*").unwrap();
        assert!(glob.covers(&path("kubepods/pod1")));
        assert!(glob.covers(&path("kubepods/pod1/ctr")));
        assert!(!glob.covers(&path("kubepods")), "above the pattern's depth");
        assert!(!glob.covers(&path("kubepods/besteffort/pod1")));
        assert!(!glob.covers(&path("system.slice/pod1")));
        let exact = Selector::parse(&cg, "kubepods").unwrap();
        assert!(exact.covers(&path("kubepods")) && exact.covers(&path("kubepods/pod1")));
        assert!(!exact.covers(&path("kubepods2")));
    }

    #[test]
    fn selectors_match_the_paths_they_select_and_nothing_below() {
        let cg = Cgroup2::at("/sys/fs/cgroup");
        let path = |p: &str| cg.parse(p).unwrap();
        let glob = Selector::parse(&cg, "kubepods/pod*").unwrap();
        assert!(glob.matches(&path("kubepods/pod1")));
        assert!(!glob.matches(&path("kubepods/pod1/ctr")), "below");
        assert!(!glob.matches(&path("kubepods")), "above");
        assert!(!glob.matches(&path("kubepods/besteffort")));
        let exact = Selector::parse(&cg, "kubepods").unwrap();
        assert!(exact.matches(&path("/kubepods")));
        assert!(!exact.matches(&path("kubepods/pod1")));
    }

    #[test]
    fn a_cgroup_gets_the_first_rule_that_selects_it_by_name_or_its_nearest_ancestors() {
        let cg = Cgroup2::at("/sys/fs/cgroup");
        let path = |p: &str| cg.parse(p).unwrap();
        let rule = |selector: &str, idle: Option<u32>| Rule {
            selector: Selector::parse(&cg, selector).unwrap(),
            spec: idle.map(|idle| Spec {
                values: Values {
                    idle,
                    ..BUILTIN_DEFAULT.values
                },
                ..BUILTIN_DEFAULT
            }),
            own: OwnValues::default(),
            source: Source::Runtime,
        };
        // In precedence order: paths, then globs.
        let rules = [
            rule("pods/masked", None),
            rule("pods", Some(50)),
            rule("pods/*", Some(40)),
            rule("other/*", Some(30)),
        ];
        let attach = path("pods");
        let got = |p: &str| {
            rule_by_name(&rules, &path(p), &attach)
                .map(|(at, rule, spec)| (at.to_string(), rule.selector.text(), spec.values.idle))
        };
        // Whether the cgroup exists or not: these do not.
        assert_eq!(
            got("pods/new"),
            Some(("/pods/new".into(), "/pods/*".into(), 40))
        );
        assert_eq!(
            got("pods/new/ctr"),
            Some(("/pods/new".into(), "/pods/*".into(), 40))
        );
        assert_eq!(
            got("pods/masked"),
            Some(("/pods".into(), "/pods".into(), 50)),
            "a mask leaves the ancestor's"
        );
        assert_eq!(got("pods"), Some(("/pods".into(), "/pods".into(), 50)));
        assert_eq!(got("other/x"), None, "outside the attach cgroup");
    }

    #[test]
    fn abi_carries_user_timeout_flag() {
        let mut spec = BUILTIN_DEFAULT;
        assert_eq!(spec.abi().flags, 0);
        spec.values.user_timeout_ms = Some(45_000);
        let abi = spec.abi();
        assert_eq!(
            (abi.user_timeout_ms, abi.flags),
            (45_000, policy_flags::USER_TIMEOUT)
        );
        assert_eq!(abi.mode, mode::ENFORCE);
    }
}
