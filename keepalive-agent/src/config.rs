//! The TOML config file: parsing, validation with file and line in every message, and the
//! command-line overrides.
//!
//! Parsing never touches the kernel, so a bad file is rejected before anything is attached or
//! changed, both at start and on reload.

use std::{
    collections::HashMap,
    fmt,
    net::{Ipv4Addr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{
    Deserialize, Deserializer,
    de::{self, Visitor},
};
use toml::Spanned;

use crate::{
    cgroup::{Cgroup2, CgroupPath},
    error::{Error, usage},
    pin::{self, StateDir},
    policy::{
        self, BUILTIN_DEFAULT, Mode, OwnValues, PolicySet, Rule, Selector, Source, Spec, limits,
    },
};

/// Where `run` looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/keepalive-agent/config.toml";

/// A number of seconds or a duration string, as written in the file.
#[derive(Debug, Clone, Copy)]
struct DurationValue(Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DurationValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of seconds or a duration string such as \"90s\" or \"2m\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<DurationValue, E> {
                u64::try_from(v)
                    .map(|secs| DurationValue(Duration::from_secs(secs)))
                    .map_err(|_| E::custom(format!("{v} is negative")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DurationValue, E> {
                Ok(DurationValue(Duration::from_secs(v)))
            }
            // Numbers past 64 bits, which toml hands over as 128-bit ones.
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<DurationValue, E> {
                Err(out_of_range(v < 0, v))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<DurationValue, E> {
                Err(out_of_range(false, v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationValue, E> {
                policy::parse_duration(v)
                    .map(DurationValue)
                    .map_err(E::custom)
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// The error for a number no value of the config can take.
fn out_of_range<E: de::Error>(negative: bool, v: impl fmt::Display) -> E {
    E::custom(format!(
        "{v} is {}",
        if negative { "negative" } else { "too large" }
    ))
}

/// A whole number as written; wrong types get a message that says what is expected.
#[derive(Debug, Clone, Copy)]
struct Integer(i64);

impl<'de> Deserialize<'de> for Integer {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Integer;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer (a whole number, without quotes)")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Integer, E> {
                Ok(Integer(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Integer, E> {
                i64::try_from(v)
                    .map(Integer)
                    .map_err(|_| out_of_range(false, v))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Integer, E> {
                Err(out_of_range(v < 0, v))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Integer, E> {
                Err(out_of_range(false, v))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A `[default]` table or a `[[policy]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    cgroup: Option<Spanned<String>>,
    idle: Option<Spanned<DurationValue>>,
    interval: Option<Spanned<DurationValue>>,
    count: Option<Spanned<Integer>>,
    user_timeout: Option<Spanned<DurationValue>>,
    mode: Option<Spanned<String>>,
}

/// The whole file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    attach: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    metrics: Option<Spanned<String>>,
    max_tracked_cgroups: Option<Spanned<Integer>>,
    max_tracked_sockets: Option<Spanned<Integer>>,
    default: Option<Spanned<RawPolicy>>,
    #[serde(default)]
    policy: Vec<Spanned<RawPolicy>>,
}

/// A validated config.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from; `None` when no file was found at the default path.
    pub file: Option<PathBuf>,
    /// `attach`: where to attach, as written, with its line.
    pub attach: Option<(String, usize)>,
    /// `state_dir`, with the file and line that name it.
    pub state_dir: Option<StateDir>,
    /// `metrics`: address of the Prometheus endpoint.
    pub metrics: Option<SocketAddr>,
    /// `max_tracked_cgroups`.
    pub max_tracked_cgroups: Option<u32>,
    /// `max_tracked_sockets`.
    pub max_tracked_sockets: Option<u32>,
    /// The default and the rules.
    pub policies: PolicySet,
}

/// Value overrides from `run`'s flags, applied over `[default]`.
#[derive(Debug, Clone, Default)]
pub struct DefaultOverrides {
    /// `--idle`.
    pub idle: Option<u32>,
    /// `--interval`.
    pub interval: Option<u32>,
    /// `--count`.
    pub count: Option<u32>,
    /// `--user-timeout`, milliseconds.
    pub user_timeout_ms: Option<u32>,
}

impl DefaultOverrides {
    fn any(&self) -> bool {
        self.idle.is_some()
            || self.interval.is_some()
            || self.count.is_some()
            || self.user_timeout_ms.is_some()
    }
}

/// Converts a byte offset to a 1-based line number.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// toml's message, with the key named where it says only "duplicate key" (its span is the key),
/// and the table or key named where serde's "invalid type" names only types.
fn toml_reason(err: &toml::de::Error, text: &str) -> String {
    let message = err.message().trim();
    let key = err
        .span()
        .and_then(|span| text.get(span))
        .map(str::trim)
        .filter(|key| !key.is_empty() && !key.contains('\n'));
    if let Some(key) = key
        && message == "duplicate key"
    {
        return format!("duplicate key `{key}`");
    }
    // serde names the types, not what was written: name the table or key instead.
    let line = err
        .span()
        .and_then(|span| text.lines().nth(line_of(text, span.start) - 1))
        .map_or("", str::trim);
    if !message.starts_with("invalid type") {
        // A value's own error (`-1 is negative`) names the key it was written for.
        return match err.span().and_then(|span| key_before(text, span.start)) {
            Some(key) => format!("{key}: {message}"),
            None => message.to_owned(),
        };
    }
    let header = line
        .strip_prefix("[[")
        .and_then(|l| l.split_once("]]"))
        .or_else(|| line.strip_prefix('[').and_then(|l| l.split_once(']')))
        .map(|(name, _)| name.trim());
    match header {
        Some("default") => return "[default] is a single table: write [default] once".into(),
        Some("policy") => {
            return "[policy] is a list of tables: write [[policy]] before each entry".into();
        }
        // `[metrics]`, `[default.mode]`: a value written as a table.
        Some(name) => {
            let (table, key) = name.rsplit_once('.').unwrap_or(("", name));
            let place = if table.is_empty() {
                "at the top of the file, before any table".to_owned()
            } else {
                format!("under [{table}]")
            };
            return format!("{key} is a value, not a table: write {key} = … {place}");
        }
        None => {}
    }
    // `default = 5`, `policy = [5]`: a table was due where a value stands.
    // toml hands dates and times over as maps too.
    let message = message
        .replace(
            "expected struct RawPolicy",
            "expected a table ([default], or [[policy]] for each entry)",
        )
        .replace("invalid type: map,", "invalid type: a table, date or time,");
    match err.span().and_then(|span| key_before(text, span.start)) {
        Some(key) => format!("{key}: {message}"),
        None => message,
    }
}

/// The key whose value starts at `offset`: what stands between the value's `=` and the
/// nearest line start, `{` or `,` before it (so the key inside an inline table, not the
/// line's first).
fn key_before(text: &str, offset: usize) -> Option<&str> {
    let before = text.get(..offset)?;
    let before = &before[before.rfind('\n').map_or(0, |i| i + 1)..];
    let before = before.trim_end().strip_suffix('=')?;
    let key = before[before.rfind(['{', ',']).map_or(0, |i| i + 1)..].trim();
    (!key.is_empty()).then_some(key)
}

struct Ctx<'a> {
    file: &'a Path,
    /// Offsets of the text's newlines, so that finding a line is a search, not a count: a
    /// config with thousands of policies would otherwise take quadratic time.
    newlines: Vec<usize>,
}

impl<'a> Ctx<'a> {
    fn new(text: &str, file: &'a Path) -> Self {
        let newlines = text.match_indices('\n').map(|(at, _)| at).collect();
        Self { file, newlines }
    }

    fn err(&self, span: Range<usize>, reason: impl Into<String>) -> anyhow::Error {
        Error::Config {
            file: self.file.to_owned(),
            line: Some(self.line(&span)),
            reason: reason.into(),
        }
        .into()
    }

    /// As [`line_of`].
    fn line(&self, span: &Range<usize>) -> usize {
        self.newlines.partition_point(|&at| at < span.start) + 1
    }

    /// Builds a policy, taking missing values from `base`.
    fn spec(&self, raw: &RawPolicy, base: &Spec) -> anyhow::Result<Spec> {
        let mut spec = *base;
        if let Some(mode) = &raw.mode {
            spec.mode = mode
                .get_ref()
                .parse()
                .map_err(|reason: String| self.err(mode.span(), format!("mode: {reason}")))?;
        }
        if let Some(idle) = &raw.idle {
            spec.values.idle = policy::check_secs("idle", idle.get_ref().0, limits::IDLE)
                .map_err(|reason| self.err(idle.span(), reason))?;
        }
        if let Some(interval) = &raw.interval {
            spec.values.interval =
                policy::check_secs("interval", interval.get_ref().0, limits::INTERVAL)
                    .map_err(|reason| self.err(interval.span(), reason))?;
        }
        if let Some(count) = &raw.count {
            spec.values.count = policy::check_count("count", count.get_ref().0)
                .map_err(|reason| self.err(count.span(), reason))?;
        }
        if let Some(timeout) = &raw.user_timeout {
            spec.values.user_timeout_ms =
                policy::check_user_timeout("user_timeout", timeout.get_ref().0)
                    .map_err(|reason| self.err(timeout.span(), reason))?;
        }
        Ok(spec)
    }
}

/// Reads the config: `path` when given (it must exist), else [`DEFAULT_CONFIG`] if present,
/// else the built-in default.
pub fn load(path: Option<&Path>, cgroup2: &Cgroup2) -> anyhow::Result<Config> {
    let (file, required) = chosen(path);
    read(file, required, cgroup2)
}

/// As [`load`], with what [`check_owner`] refuses kept apart rather than in place of the
/// config: `check` validates the content of a file `run` would refuse for its owner too.
pub fn load_apart(
    path: Option<&Path>,
    cgroup2: &Cgroup2,
) -> (anyhow::Result<Config>, Option<anyhow::Error>) {
    let (file, required) = chosen(path);
    match read_text(file, required) {
        Ok(Some((text, meta))) => (parse(&text, file, cgroup2), check_owner(file, &meta).err()),
        Ok(None) => (Ok(builtin()), None),
        Err(err) => (Err(err), None),
    }
}

/// The file to read, and whether it must exist.
fn chosen(path: Option<&Path>) -> (&Path, bool) {
    match path {
        Some(path) => (path, true),
        None => (Path::new(DEFAULT_CONFIG), false),
    }
}

/// Reads the config again, for a reload of one read from `previous` (`None`: the built-in
/// default). As [`load`], except that a file read before must still be there: falling back to
/// the built-in default would drop its policies with no more than a log line.
pub fn reload(
    path: Option<&Path>,
    previous: Option<&Path>,
    cgroup2: &Cgroup2,
) -> anyhow::Result<Config> {
    let Some(file) = path.or(previous) else {
        return load(None, cgroup2);
    };
    read(file, true, cgroup2).map_err(|err| match err.downcast::<Error>() {
        // Gone, not unreadable for another reason (a symlink loop, say). The default file
        // may go for the built-in default; one named with `--config` must be there.
        Ok(Error::Config { file, line, reason }) if matches!(file.try_exists(), Ok(false)) => {
            let or_default = if path.is_none() {
                ", or write one with only its attach and state_dir lines (if it had them; a \
                 reload cannot change those) for the built-in default"
            } else {
                ""
            };
            Error::Config {
                file,
                line,
                reason: format!("{reason}; it was read at start: restore it{or_default}"),
            }
            .into()
        }
        Ok(err) => err.into(),
        Err(err) => err,
    })
}

/// Reads and parses `file`; when it does not exist and is not `required`, the built-in
/// default. A file someone other than root could write is refused before it is parsed.
fn read(file: &Path, required: bool, cgroup2: &Cgroup2) -> anyhow::Result<Config> {
    match read_text(file, required)? {
        Some((text, meta)) => {
            check_owner(file, &meta)?;
            parse(&text, file, cgroup2)
        }
        None => Ok(builtin()),
    }
}

/// A config path that leads through a symbolic link to nothing: one from config management
/// whose target is missing, or on a file system not mounted yet. Not the "no file" that means
/// the built-in default, which would silently drop every policy the file holds; and not a
/// config error either (exit 2, which the unit does not retry): exit 1, retried, so the agent
/// starts with the file once its target appears.
#[derive(Debug)]
pub struct DanglingLink {
    file: PathBuf,
    link: PathBuf,
    target: PathBuf,
}

impl fmt::Display for DanglingLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: cannot read: {} is a symbolic link to {}, which does not exist",
            self.file.display(),
            self.link.display(),
            self.target.display()
        )
    }
}

impl std::error::Error for DanglingLink {}

/// The most a config file may hold: far more than [`keepalive_common::MAX_POLICIES`] policies
/// take, and a bound on what a wrong path makes the agent read into memory.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// The text of `file` and the metadata of the very file it was read from (one open, so the
/// owner checked is the text's, even if the path is replaced meanwhile); `None` when it does
/// not exist and is not `required` (a [`DanglingLink`] is an error either way).
///
/// Only a regular file is read, and at most [`MAX_CONFIG_BYTES`] of it. The open does not wait:
/// a FIFO without a writer would hold `run` (and a reload) forever, and `/dev/zero` would fill
/// memory; `/dev/null` would read as an empty file, the built-in default.
fn read_text(file: &Path, required: bool) -> anyhow::Result<Option<(String, std::fs::Metadata)>> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    let read = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(file)
        .and_then(|opened| {
            let meta = opened.metadata()?;
            if !meta.is_file() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("it is {}, not a regular file", file_kind(&meta)),
                ));
            }
            let mut bytes = Vec::new();
            opened.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes)?;
            if bytes.len() as u64 > MAX_CONFIG_BYTES {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "larger than {} MiB, far more than any config takes",
                        MAX_CONFIG_BYTES >> 20
                    ),
                ));
            }
            Ok((bytes, meta))
        });
    let err = match read {
        Ok((bytes, meta)) => {
            return match String::from_utf8(bytes) {
                Ok(text) => Ok(Some((text, meta))),
                Err(err) => Err(not_utf8(
                    file,
                    err.as_bytes(),
                    err.utf8_error().valid_up_to(),
                )),
            };
        }
        Err(err) => err,
    };
    let missing = err.kind() == std::io::ErrorKind::NotFound;
    if let Some((link, target)) = missing.then(|| dangling_link(file)).flatten() {
        return Err(DanglingLink {
            file: file.to_owned(),
            link,
            target,
        }
        .into());
    }
    if missing && !required {
        return Ok(None);
    }
    Err(Error::Config {
        file: file.to_owned(),
        line: None,
        reason: format!("cannot read: {err}"),
    }
    .into())
}

/// The error of a config whose bytes from `valid_up_to` on are not UTF-8, at their line.
fn not_utf8(file: &Path, bytes: &[u8], valid_up_to: usize) -> anyhow::Error {
    let before = &bytes[..valid_up_to];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = before.len()
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1)
        + 1;
    Error::Config {
        file: file.to_owned(),
        line: Some(line),
        reason: format!("not UTF-8 text (byte {column} of the line); write the config as UTF-8"),
    }
    .into()
}

/// What a file that is not a regular one is, for an error.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    let kind = meta.file_type();
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "of an unusual type"
    }
}

/// The symbolic link whose target is missing, with that target, on the path to `file` (itself
/// included).
pub(crate) fn dangling_link(file: &Path) -> Option<(PathBuf, PathBuf)> {
    file.ancestors().find_map(|path| {
        let link = path.symlink_metadata().ok()?.file_type().is_symlink();
        let gone = link
            && path
                .metadata()
                .is_err_and(|err| err.kind() == std::io::ErrorKind::NotFound);
        gone.then(|| Some((path.to_owned(), std::fs::read_link(path).ok()?)))
            .flatten()
    })
}

/// The config without a file: the built-in default.
fn builtin() -> Config {
    Config {
        file: None,
        attach: None,
        state_dir: None,
        metrics: None,
        max_tracked_cgroups: None,
        max_tracked_sockets: None,
        policies: PolicySet::new(BUILTIN_DEFAULT, Source::Builtin),
    }
}

/// Why the agent would refuse `file` for what it is (a directory, a FIFO: see [`read_text`]),
/// if it would; `None` also when it cannot be read.
pub fn refused_kind(file: &Path) -> Option<String> {
    let meta = std::fs::metadata(file).ok()?;
    (!meta.is_file()).then(|| format!("it is {}, not a regular file", file_kind(&meta)))
}

/// Why the agent would refuse `file` for its owner or mode (see [`check_owner`]), if it would;
/// `None` also when it cannot be read.
pub fn refused_owner(file: &Path) -> Option<String> {
    let meta = std::fs::metadata(file).ok()?;
    owner_reason(file, &meta)
}

/// Refuses a config file that someone other than root could have written: it decides what the
/// kernel does to every connection on the host.
fn check_owner(file: &Path, meta: &std::fs::Metadata) -> anyhow::Result<()> {
    match owner_reason(file, meta) {
        None => Ok(()),
        Some(reason) => Err(Error::Config {
            file: file.to_owned(),
            line: None,
            reason,
        }
        .into()),
    }
}

/// What [`check_owner`] refuses, with the command that fixes it.
fn owner_reason(file: &Path, meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    if meta.uid() != 0 {
        Some(format!(
            "owned by uid {}, not root; fix with `chown root {}`",
            meta.uid(),
            file.display()
        ))
    } else if let Some(reason) = mode_reason(file, meta) {
        Some(reason)
    } else {
        foreign_directory(file).map(|(dir, uid)| {
            format!(
                "the directory {} on the way to it belongs to uid {uid}, who could replace \
                 the file; fix with `chown root {}`",
                dir.display(),
                dir.display()
            )
        })
    }
}

/// What [`check_owner`] refuses of `file`'s mode alone: in a staging tree, whose owners a
/// package sets, the mode is all that carries over.
pub fn refused_mode(file: &Path) -> Option<String> {
    mode_reason(file, &std::fs::metadata(file).ok()?)
}

fn mode_reason(file: &Path, meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    (meta.mode() & 0o022 != 0).then(|| {
        format!(
            "writable by users other than root (mode {:04o}); fix with `chmod go-w {}`",
            meta.mode() & 0o7777,
            file.display()
        )
    })
}

/// A directory that holds `file`, or a symbolic link on the way to it, or one that such a link
/// leads through, and belongs to a user other than root and this process's: one who could
/// replace the file. (Who else may write to a directory is not judged: a Kubernetes ConfigMap
/// volume is mode 0777, reached only by the pod's own processes.)
fn foreign_directory(file: &Path) -> Option<(PathBuf, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    let file = std::path::absolute(file).ok()?;
    // Each directory as named and as its links resolve (the file's own, too), with those
    // above it.
    let named = file.ancestors().skip(1);
    let resolved = std::fs::canonicalize(&file).ok();
    let resolved = resolved.iter().flat_map(|real| real.ancestors().skip(1));
    named
        .filter_map(|dir| std::fs::canonicalize(dir).ok())
        .chain(resolved.map(Path::to_owned))
        .flat_map(|dir| dir.ancestors().map(Path::to_owned).collect::<Vec<_>>())
        .find_map(|dir| {
            let uid = std::fs::metadata(&dir).ok()?.uid();
            (uid != 0 && uid != euid).then_some((dir, uid))
        })
}

/// Parses and validates config text.
pub fn parse(text: &str, file: &Path, cgroup2: &Cgroup2) -> anyhow::Result<Config> {
    let ctx = Ctx::new(text, file);
    let raw: RawConfig = toml::from_str(text).map_err(|err| Error::Config {
        file: file.to_owned(),
        line: err.span().map(|span| line_of(text, span.start)),
        reason: toml_reason(&err, text),
    })?;

    let (default, default_source) = match &raw.default {
        Some(table) => {
            if let Some(cgroup) = &table.get_ref().cgroup {
                return Err(ctx.err(
                    cgroup.span(),
                    "[default] applies everywhere and takes no `cgroup` key; use [[policy]]",
                ));
            }
            let spec = ctx.spec(table.get_ref(), &BUILTIN_DEFAULT)?;
            let line = ctx.line(&table.span());
            (
                spec,
                Source::Config {
                    file: file.to_owned(),
                    line,
                },
            )
        }
        None => (BUILTIN_DEFAULT, Source::Builtin),
    };

    let max = keepalive_common::MAX_POLICIES as usize;
    if let Some(first_over) = raw.policy.get(max) {
        return Err(ctx.err(
            first_over.span(),
            format!(
                "{} policies; at most {max} are supported, and this is the first beyond",
                raw.policy.len()
            ),
        ));
    }
    let mut exact = Vec::new();
    let mut globs = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for entry in &raw.policy {
        let raw_policy = entry.get_ref();
        let line = ctx.line(&entry.span());
        let Some(cgroup) = &raw_policy.cgroup else {
            return Err(ctx.err(entry.span(), "[[policy]] needs a `cgroup` key"));
        };
        // The messages start with "cgroup …" themselves.
        let selector = Selector::parse(cgroup2, cgroup.get_ref())
            .map_err(|err| ctx.err(cgroup.span(), err.to_string()))?;
        let key = selector.text();
        if let Some(first) = seen.insert(key.clone(), ctx.line(&cgroup.span())) {
            return Err(ctx.err(
                cgroup.span(),
                format!("duplicate policy for cgroup {key} (first defined on line {first})"),
            ));
        }
        let spec = ctx.spec(raw_policy, &default)?;
        let own = OwnValues {
            idle: raw_policy.idle.is_some(),
            interval: raw_policy.interval.is_some(),
            count: raw_policy.count.is_some(),
            user_timeout: raw_policy.user_timeout.is_some(),
        };
        if raw_policy.mode.is_none()
            && spec.mode == Mode::Off
            && let Some(key) = own.first()
        {
            return Err(ctx.err(
                entry.span(),
                format!(
                    "the policy for cgroup {} sets {key} but no mode, and the mode it takes \
                     from [default] is \"off\": it would enforce nothing; add \
                     mode = \"enforce\" (or \"fill\" or \"lock\")",
                    cgroup.get_ref()
                ),
            ));
        }
        let rule = Rule {
            selector,
            spec: Some(spec),
            own,
            source: Source::Config {
                file: file.to_owned(),
                line,
            },
        };
        if rule.selector.is_glob() {
            globs.push(rule);
        } else {
            exact.push(rule);
        }
    }
    let rules = exact.into_iter().chain(globs).collect();

    let attach = match &raw.attach {
        Some(attach) => {
            parse_attach(cgroup2, attach.get_ref())
                .and_then(|path| policy::check_not_a_file(cgroup2, &path))
                .map_err(|err| ctx.err(attach.span(), format!("attach: {err}")))?;
            Some((attach.get_ref().clone(), ctx.line(&attach.span())))
        }
        None => None,
    };
    let metrics = match &raw.metrics {
        Some(addr) => Some(parse_listen(addr.get_ref()).map_err(|err| {
            ctx.err(
                addr.span(),
                format!("metrics = \"{}\": {err}", addr.get_ref()),
            )
        })?),
        None => None,
    };
    let capacity = |value: &Option<Spanned<Integer>>, key: &str| -> anyhow::Result<Option<u32>> {
        let Some(max) = value else {
            return Ok(None);
        };
        u32::try_from(max.get_ref().0)
            .ok()
            .filter(|n| (1..=1 << 24).contains(n))
            .map(Some)
            .ok_or_else(|| {
                ctx.err(
                    max.span(),
                    format!(
                        "{key} = {} is out of range; accepted: 1 to 16777216",
                        max.get_ref().0
                    ),
                )
            })
    };
    let max_tracked_cgroups = capacity(&raw.max_tracked_cgroups, "max_tracked_cgroups")?;
    let max_tracked_sockets = capacity(&raw.max_tracked_sockets, "max_tracked_sockets")?;
    let state_dir = match &raw.state_dir {
        Some(dir) => Some(StateDir::configured(
            pin::parse_dir(dir.get_ref()).map_err(|err| {
                ctx.err(
                    dir.span(),
                    format!("state_dir: {err}; give an absolute path on bpffs"),
                )
            })?,
            file.to_owned(),
            line_of(text, dir.span().start),
        )),
        None => None,
    };

    Ok(Config {
        file: Some(file.to_owned()),
        attach,
        state_dir,
        metrics,
        max_tracked_cgroups,
        max_tracked_sockets,
        policies: PolicySet {
            default,
            default_source,
            rules,
        },
    })
}

impl Config {
    /// Applies `run`'s value flags over `[default]`. Values a rule does not set itself follow
    /// the new default, as if the file had said it; values it sets stay.
    ///
    /// Returns a note for each value of the file's `[default]` that a flag takes the place of,
    /// so a change to it in the file, which a reload reads, does not go unexplained.
    pub fn apply_overrides(&mut self, overrides: &DefaultOverrides) -> Vec<String> {
        if !overrides.any() {
            return Vec::new();
        }
        let mut notes = Vec::new();
        if let Source::Config { file, line } = &self.policies.default_source {
            let seconds = |s: u32| crate::status::duration_cell(Duration::from_secs(s.into()));
            let ms = |ms: Option<u32>| {
                ms.map_or("none".to_owned(), |ms| {
                    crate::status::duration_cell(Duration::from_millis(ms.into()))
                })
            };
            let was = self.policies.default.values;
            let flags = [
                ("idle", overrides.idle.map(seconds), seconds(was.idle)),
                (
                    "interval",
                    overrides.interval.map(seconds),
                    seconds(was.interval),
                ),
                (
                    "count",
                    overrides.count.map(|c| c.to_string()),
                    was.count.to_string(),
                ),
                (
                    "user-timeout",
                    overrides.user_timeout_ms.map(|v| ms((v != 0).then_some(v))),
                    ms(was.user_timeout_ms),
                ),
            ];
            for (flag, given, file_value) in flags {
                if let Some(given) = given
                    && given != file_value
                {
                    notes.push(format!(
                        "--{flag} {given} given to `run` takes the place of {} {file_value} of \
                         [default] at {}:{line}; restart the agent without it for the file's \
                         to apply",
                        flag.replace('-', "_"),
                        file.display()
                    ));
                }
            }
        }
        let default = &mut self.policies.default.values;
        if let Some(idle) = overrides.idle {
            default.idle = idle;
        }
        if let Some(interval) = overrides.interval {
            default.interval = interval;
        }
        if let Some(count) = overrides.count {
            default.count = count;
        }
        if let Some(ms) = overrides.user_timeout_ms {
            default.user_timeout_ms = (ms != 0).then_some(ms);
        }
        let new = *default;
        self.policies.default_source = Source::CommandLine;
        for rule in &mut self.policies.rules {
            if let Some(spec) = &mut rule.spec {
                if !rule.own.idle {
                    spec.values.idle = new.idle;
                }
                if !rule.own.interval {
                    spec.values.interval = new.interval;
                }
                if !rule.own.count {
                    spec.values.count = new.count;
                }
                if !rule.own.user_timeout {
                    spec.values.user_timeout_ms = new.user_timeout_ms;
                }
            }
        }
        notes
    }

    /// The file's policies that select no cgroup within `attach` now, each with why and where
    /// it is written: a misspelt path looks like a cgroup that does not exist yet.
    pub fn pending(&self, cgroup2: &Cgroup2, attach: &CgroupPath) -> Vec<String> {
        self.policies
            .rules
            .iter()
            .filter_map(|rule| {
                let why = rule.selector.selects_nothing(cgroup2, attach)?;
                Some(format!(
                    "{} (policy at {}) {why}; check the path if it was meant for a cgroup \
                     that exists",
                    rule.selector.text(),
                    rule.source
                ))
            })
            .collect()
    }

    /// The attach cgroup, as `run` picks it: `cgroup` (its `--cgroup`), else `attach`, else
    /// the cgroup2 root.
    pub fn attach_cgroup(
        &self,
        cgroup: Option<&str>,
        cgroup2: &Cgroup2,
    ) -> anyhow::Result<CgroupPath> {
        match cgroup.or_else(|| self.attach.as_ref().map(|a| a.0.as_str())) {
            Some(spec) => parse_attach(cgroup2, spec),
            None => Ok(CgroupPath::root()),
        }
    }

    /// Checks that every rule can select cgroups inside `attach`.
    pub fn check_scope(&self, attach: &CgroupPath) -> anyhow::Result<()> {
        for rule in &self.policies.rules {
            if let Err(reason) = rule.selector.check_reaches(attach) {
                return Err(match &rule.source {
                    Source::Config { file, line } => Error::Config {
                        file: file.clone(),
                        line: Some(*line),
                        reason,
                    },
                    _ => Error::Usage(reason),
                }
                .into());
            }
        }
        Ok(())
    }
}

/// The one cgroup to attach to. A pattern is refused: it would name no cgroup, and `run`
/// would wait for one that never appears.
pub fn parse_attach(cgroup2: &Cgroup2, spec: &str) -> anyhow::Result<CgroupPath> {
    let path = cgroup2.parse(spec)?;
    if path.components().any(policy::is_glob) {
        return Err(usage(format!(
            "{spec} is a pattern; attach takes one cgroup (policies take patterns)"
        )));
    }
    Ok(path)
}

/// A listening address: `address:port`, an IPv6 address in brackets. An IPv4 address may be in
/// brackets too, so one template such as `[$(HOST_IP)]:9977` serves either family.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let bracketed_v4 = text
        .strip_prefix('[')
        .and_then(|rest| rest.split_once("]:"))
        .and_then(|(ip, port)| Some((ip.parse::<Ipv4Addr>().ok()?, port.parse::<u16>().ok()?)));
    match bracketed_v4 {
        Some((ip, port)) => Ok(SocketAddr::from((ip, port))),
        None => text.parse().map_err(|err| {
            format!("{err}; expected an address such as \"127.0.0.1:9977\" or \"[::1]:9977\"")
        }),
    }
    .and_then(|addr: SocketAddr| match addr.port() {
        // The kernel would pick one that nobody scraping knows.
        0 => Err(
            "port 0 picks no port to scrape; expected an address such as \
                  \"127.0.0.1:9977\" or \"[::1]:9977\""
                .to_owned(),
        ),
        _ => Ok(addr),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cg() -> Cgroup2 {
        Cgroup2::at("/sys/fs/cgroup")
    }

    fn parse_ok(text: &str) -> Config {
        parse(text, Path::new("/etc/k.toml"), &cg()).expect("valid config")
    }

    fn parse_err(text: &str) -> (Option<usize>, String) {
        let err = parse(text, Path::new("/etc/k.toml"), &cg()).expect_err("invalid config");
        match err.downcast::<Error>().expect("config error") {
            Error::Config { file, line, reason } => {
                assert_eq!(file, Path::new("/etc/k.toml"));
                (line, reason)
            }
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn too_many_policies_name_the_first_beyond_the_limit() {
        let max = keepalive_common::MAX_POLICIES as usize;
        let text: String = (0..=max)
            .map(|i| format!("[[policy]]\ncgroup = \"/p{i}\"\nidle = 5\n"))
            .collect();
        let (line, reason) = parse_err(&text);
        assert_eq!(line, Some(3 * max + 1), "{reason}");
        assert!(
            reason.contains(&format!("{} policies; at most {max}", max + 1)),
            "{reason}"
        );
        let fits: String = text
            .lines()
            .take(3 * max)
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(parse_ok(&fits).policies.rules.len(), max);
    }

    const EXAMPLE: &str = r#"# optional; default is the cgroup2 root
attach = "/sys/fs/cgroup"

[default]
idle = 60
interval = 10
count = 5
mode = "enforce"

[[policy]]
cgroup = "system.slice/postgresql.service"   # relative to the cgroup2 mount; see "Cgroup paths"
idle = 30
interval = 5
count = 3
user_timeout = "45s"

[[policy]]
cgroup = "system.slice/docker-*.scope"       # glob
mode = "off"
"#;

    #[test]
    fn parses_the_documented_example() {
        let config = parse_ok(EXAMPLE);
        assert_eq!(config.attach.as_ref().map(|a| a.1), Some(2));
        assert_eq!(config.policies.default, BUILTIN_DEFAULT);
        let [pg, docker] = config.policies.rules.as_slice() else {
            panic!("two rules");
        };
        let pg_spec = pg.spec.unwrap();
        assert_eq!(pg_spec.values.idle, 30);
        assert_eq!(pg_spec.values.user_timeout_ms, Some(45_000));
        assert_eq!(pg.source.to_string(), "/etc/k.toml:10");
        assert!(docker.selector.is_glob());
        assert_eq!(docker.spec.unwrap().mode, Mode::Off);
        // Unset values inherit from [default].
        assert_eq!(docker.spec.unwrap().values.idle, 60);
    }

    #[test]
    fn rejects_unknown_keys_with_line() {
        let (line, reason) = parse_err("[default]\nidle = 5\nidel = 6\n");
        assert_eq!(line, Some(3));
        assert!(reason.contains("idel"), "{reason}");
        let (line, reason) = parse_err("atach = \"/\"\n");
        assert_eq!(line, Some(1));
        assert!(reason.contains("atach"), "{reason}");
    }

    #[test]
    fn rejects_wrong_types_with_line() {
        let (line, reason) = parse_err("[default]\ncount = \"five\"\n");
        assert_eq!(line, Some(2));
        assert!(reason.contains("integer"), "{reason}");
        let (line, reason) = parse_err("[default]\n\nidle = true\n");
        assert_eq!(line, Some(3));
        assert!(reason.contains("duration"), "{reason}");
        let (line, _) = parse_err("[[policy]]\ncgroup = 5\n");
        assert_eq!(line, Some(2));
        let (line, reason) = parse_err("[default]\nmode = \"strict\"\n");
        assert_eq!(line, Some(2));
        assert!(reason.contains("enforce, fill, off, lock"), "{reason}");
    }

    #[test]
    fn rejects_out_of_range_values_with_line() {
        let (line, reason) = parse_err("[default]\nidle = 0\n");
        assert_eq!(line, Some(2));
        assert!(reason.contains("1 to 32767"), "{reason}");
        let (line, reason) = parse_err("[[policy]]\ncgroup = \"a\"\ninterval = \"10h\"\n");
        assert_eq!(line, Some(3));
        assert!(reason.contains("36000"), "{reason}");
        let (line, reason) = parse_err("[[policy]]\ncgroup = \"a\"\n\ncount = 200\n");
        assert_eq!(line, Some(4));
        assert!(reason.contains("1 to 127"), "{reason}");
        let (line, reason) = parse_err("[default]\nidle = \"1500ms\"\n");
        assert_eq!(line, Some(2));
        assert!(reason.contains("whole number of seconds"), "{reason}");
        let (line, _) = parse_err("[default]\nuser_timeout = -1\n");
        assert_eq!(line, Some(2));
        let (line, _) = parse_err("max_tracked_cgroups = 0\n");
        assert_eq!(line, Some(1));
        // Errors from the value's own parsing name the key too.
        for (text, said) in [
            (
                "[default]\ncount = 18446744073709551615\n",
                "count: 18446744073709551615 is too large",
            ),
            ("[default]\nidle = -1\n", "idle: -1 is negative"),
            // Past 64 bits, as toml hands them over (128-bit).
            (
                "[default]\nidle = 99999999999999999999\n",
                "idle: 99999999999999999999 is too large",
            ),
            (
                "[default]\nuser_timeout = -99999999999999999999\n",
                "user_timeout: -99999999999999999999 is negative",
            ),
            (
                "[default]\ncount = 99999999999999999999\n",
                "count: 99999999999999999999 is too large",
            ),
            ("[default]\ninterval = \"soon\"\n", "interval: "),
            (
                "\nmax_tracked_cgroups = 18446744073709551615\n",
                "max_tracked_cgroups: ",
            ),
            (
                "[default]\nidle = 1979-05-27\n",
                "idle: invalid type: a table, date or time,",
            ),
        ] {
            let (line, reason) = parse_err(text);
            assert_eq!(line, Some(2), "{text}");
            assert!(reason.starts_with(said), "{reason}");
        }
        let (line, reason) = parse_err("\nmax_tracked_sockets = 99999999999\n");
        assert_eq!(line, Some(2));
        assert!(reason.contains("max_tracked_sockets"), "{reason}");
        let (line, reason) = parse_err("metrics = \"localhost\"\n");
        assert_eq!(line, Some(1));
        assert!(reason.contains("127.0.0.1:9977"), "{reason}");
    }

    #[test]
    fn rejects_what_would_name_no_directory_with_line() {
        // An empty value (an unset template variable) must not mean the root.
        let (line, reason) = parse_err("\nattach = \"\"\n");
        assert_eq!(line, Some(2));
        assert!(reason.contains("write \"/\" for the root"), "{reason}");
        let (line, reason) = parse_err("[[policy]]\ncgroup = \"\"\nidle = 30\n");
        assert_eq!(line, Some(2));
        assert!(reason.contains("empty"), "{reason}");
        // attach is one cgroup: `run` would wait forever for a pattern to exist.
        let (line, reason) = parse_err("attach = \"kubepods.slice/*\"\n");
        assert_eq!(line, Some(1));
        assert!(reason.contains("attach takes one cgroup"), "{reason}");
        // `..` could lead the bpffs checks to mount over /sys/fs/bpf.
        let (line, reason) = parse_err("\n\nstate_dir = \"/sys/fs/bpf/../../tmp/ka\"\n");
        assert_eq!(line, Some(3));
        assert!(reason.contains("`..`"), "{reason}");
        let (_, reason) = parse_err("state_dir = \"keepalive\"\n");
        assert!(reason.contains("absolute"), "{reason}");
        // A NUL, which TOML can spell, would cut the path short in the kernel.
        for (text, at) in [
            ("state_dir = \"/sys/fs/bpf/ka\\u0000x\"\n", 1),
            ("\nattach = \"a\\u0000b\"\n", 2),
            ("[[policy]]\ncgroup = \"a\\u0000*\"\nidle = 30\n", 2),
        ] {
            let (line, reason) = parse_err(text);
            assert_eq!(line, Some(at), "{text}");
            assert!(reason.contains("contains a NUL character"), "{reason}");
        }
        let (line, reason) = parse_err("[[policy]]\ncgroup = \"/we\\nird\"\nidle = 30\n");
        assert_eq!(line, Some(2));
        assert!(reason.contains("contains a line break"), "{reason}");
        // Spelled one way, so a reload compares it with the running one.
        let config = parse_ok("state_dir = \"/sys/fs/bpf/ka/\"\n");
        let state = config.state_dir.expect("state_dir");
        assert_eq!(state.root(), Path::new("/sys/fs/bpf/ka"));
    }

    #[test]
    fn errors_name_what_is_wrong_once() {
        let (line, reason) = parse_err("[default]\nidle = 30\n\nidle = 40\n");
        assert_eq!((line, reason.as_str()), (Some(4), "duplicate key `idle`"));
        let (line, reason) = parse_err("[default]\nidle = 30\n[default]\ncount = 3\n");
        assert_eq!(line, Some(3));
        assert!(reason.starts_with("duplicate key `"), "{reason}");
        // Tables and keys of the wrong kind are named as written, not as serde's types.
        let (line, reason) = parse_err("[policy]\ncgroup = \"a\"\nidle = 3\n");
        assert_eq!(line, Some(1));
        assert_eq!(
            reason,
            "[policy] is a list of tables: write [[policy]] before each entry"
        );
        let (_, reason) = parse_err("[[default]]\nidle = 3\n");
        assert_eq!(reason, "[default] is a single table: write [default] once");
        // Other headers name values, which no advice about tables would fix.
        for text in [
            "[metrics]\naddress = \"127.0.0.1:1\"\n",
            "[[metrics]]\na = 1\n",
        ] {
            let (line, reason) = parse_err(text);
            assert_eq!(line, Some(1), "{text}");
            assert_eq!(
                reason,
                "metrics is a value, not a table: write metrics = … at the top of the file, \
                 before any table"
            );
        }
        let (_, reason) = parse_err("[default.mode]\nx = 1\n");
        assert_eq!(
            reason,
            "mode is a value, not a table: write mode = … under [default]"
        );
        let (line, reason) = parse_err("[default]\nidle = 3\nmode = 1\n");
        assert_eq!(line, Some(3));
        assert_eq!(reason, "mode: invalid type: integer `1`, expected a string");
        // In inline tables, the key is the one inside the braces, not the line's first.
        let (line, reason) = parse_err("default = { idle = 30, mode = 1 }\n");
        assert_eq!(line, Some(1));
        assert_eq!(reason, "mode: invalid type: integer `1`, expected a string");
        let (_, reason) =
            parse_err("policy = [{ cgroup = \"a\" }, { cgroup = \"b\", count = \"z\" }]\n");
        assert!(
            reason.starts_with("count: invalid type: string"),
            "{reason}"
        );
        let (_, reason) = parse_err("[[policy]]\ncgroup = \"a\"\nidle = {x = 1}\n");
        assert!(
            reason.starts_with("idle: invalid type: a table"),
            "{reason}"
        );
        // The cgroup messages start with "cgroup" themselves.
        let (line, reason) = parse_err("[[policy]]\ncgroup = \"a/[\"\nidle = 30\n");
        assert_eq!(line, Some(2));
        assert!(
            reason.starts_with("cgroup pattern a/[ is not a valid glob"),
            "{reason}"
        );
    }

    #[test]
    fn listen_addresses_take_either_family_in_brackets() {
        let ok = |text: &str| parse_listen(text).unwrap().to_string();
        assert_eq!(ok("127.0.0.1:9977"), "127.0.0.1:9977");
        assert_eq!(ok("[10.0.0.7]:9977"), "10.0.0.7:9977");
        assert_eq!(ok("[fd00::7]:9977"), "[fd00::7]:9977");
        for bad in [
            "[10.0.0.7]",
            "[10.0.0.7]:",
            "[10.0.0.7]:99999",
            "[10.0.0.7]:0",
            "127.0.0.1:0",
            "[host]:1",
            "::1:9977",
            "",
        ] {
            let err = parse_listen(bad).unwrap_err();
            assert!(err.contains("[::1]:9977"), "{bad}: {err}");
        }
    }

    #[test]
    fn rejects_duplicates_with_both_lines() {
        let text = "[[policy]]\ncgroup = \"a/b\"\n\n[[policy]]\ncgroup = \"/sys/fs/cgroup/a/b/\"\n";
        let (line, reason) = parse_err(text);
        assert_eq!(line, Some(5));
        assert!(
            reason.contains("duplicate") && reason.contains("line 2"),
            "{reason}"
        );
    }

    #[test]
    fn a_reload_says_restore_it_only_for_a_file_that_is_gone() {
        let dir = std::env::temp_dir().join(format!("ka-config-gone-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let (gone, looped) = (dir.join("gone.toml"), dir.join("loop.toml"));
        std::os::unix::fs::symlink(&looped, &looped).unwrap();
        let reason = |file: &Path| format!("{:#}", reload(None, Some(file), &cg()).unwrap_err());
        let named = format!("{:#}", reload(Some(&gone), Some(&gone), &cg()).unwrap_err());
        let (gone, looped) = (reason(&gone), reason(&looped));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            gone.contains("restore it, or write one with only its attach"),
            "{gone}"
        );
        // Named with --config: a start without it fails, so there is no default to fall to.
        assert!(
            named.ends_with("it was read at start: restore it"),
            "{named}"
        );
        assert!(
            !looped.contains("restore it") && looped.contains("cannot read"),
            "{looped}"
        );
    }

    #[test]
    fn rejects_structural_mistakes() {
        let (line, reason) = parse_err("[[policy]]\nidle = 5\n");
        assert_eq!(line, Some(1));
        assert!(reason.contains("cgroup"), "{reason}");
        let (line, reason) = parse_err("[default]\ncgroup = \"x\"\n");
        assert_eq!(line, Some(2));
        assert!(reason.contains("[[policy]]"), "{reason}");
        let (line, reason) = parse_err("[[policy]]\ncgroup = \"/sys/kernel/x\"\n");
        assert_eq!(line, Some(2));
        assert!(reason.contains("not under the cgroup2 mount"), "{reason}");
        let (line, _) = parse_err("[default\nidle = 5\n");
        assert_eq!(line, Some(1));
        let (line, reason) = parse_err("state_dir = \"relative\"\n");
        assert_eq!(line, Some(1));
        assert!(reason.contains("absolute"), "{reason}");
        // Serde's names for the file's parts stay out of the message.
        for text in ["default = 5\n", "policy = [5]\n"] {
            let (line, reason) = parse_err(text);
            assert_eq!(line, Some(1));
            assert!(
                reason.contains("expected a table ([default], or [[policy]] for each entry)")
                    && !reason.contains("Raw"),
                "{text}: {reason}"
            );
        }
    }

    #[test]
    fn rejects_values_that_inherit_off_from_the_default() {
        let (line, reason) = parse_err(
            "[default]\nmode = \"off\"\n\n[[policy]]\ncgroup = \"a\"\nidle = 30\ncount = 2\n",
        );
        assert_eq!(line, Some(4));
        assert!(
            reason.contains("cgroup a sets idle but no mode")
                && reason.contains("mode = \"enforce\""),
            "{reason}"
        );
        let (_, reason) =
            parse_err("[default]\nmode = \"off\"\n[[policy]]\ncgroup = \"a\"\nuser_timeout = 5\n");
        assert!(reason.contains("sets user_timeout"), "{reason}");
        // Values with a mode of their own, `off` written out, and an `off` rule with nothing
        // to inherit wrongly are all fine.
        let config = parse_ok(
            "[default]\nmode = \"off\"\nidle = 40\n[[policy]]\ncgroup = \"a\"\nidle = 30\n\
             mode = \"fill\"\n[[policy]]\ncgroup = \"b\"\n[[policy]]\ncgroup = \"c\"\n\
             mode = \"off\"\nidle = 9\n",
        );
        let modes: Vec<Mode> = config
            .policies
            .rules
            .iter()
            .map(|r| r.spec.unwrap().mode)
            .collect();
        assert_eq!(modes, [Mode::Fill, Mode::Off, Mode::Off]);
        assert_eq!(config.policies.rules[0].spec.unwrap().values.idle, 30);
    }

    #[test]
    fn overrides_leave_values_a_rule_sets_itself() {
        let mut config = parse_ok("[default]\nidle = 60\n[[policy]]\ncgroup = \"a\"\nidle = 60\n");
        config.apply_overrides(&DefaultOverrides {
            idle: Some(20),
            ..Default::default()
        });
        assert_eq!(config.policies.rules[0].spec.unwrap().values.idle, 60);
    }

    #[test]
    fn overrides_name_the_values_of_the_files_default_they_take_the_place_of() {
        let mut config = parse_ok("[default]\nidle = 20\ncount = 3\n");
        let notes = config.apply_overrides(&DefaultOverrides {
            idle: Some(45),
            count: Some(3),
            user_timeout_ms: Some(0),
            ..Default::default()
        });
        // The count and the user timeout the file has already: nothing taken the place of.
        assert_eq!(
            notes,
            [
                "--idle 45s given to `run` takes the place of idle 20s of [default] at \
              /etc/k.toml:1; restart the agent without it for the file's to apply"
            ]
        );
        // No [default] in the file: nothing of it to take the place of.
        let mut config = parse_ok("[[policy]]\ncgroup = \"a\"\nidle = 5\n");
        let notes = config.apply_overrides(&DefaultOverrides {
            idle: Some(45),
            ..Default::default()
        });
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[test]
    fn overrides_flow_into_inheriting_rules() {
        let mut config = parse_ok(
            "[default]\nidle = 60\n[[policy]]\ncgroup = \"a\"\ncount = 2\n[[policy]]\ncgroup = \"b\"\nidle = 7\n",
        );
        config.apply_overrides(&DefaultOverrides {
            idle: Some(20),
            ..Default::default()
        });
        assert_eq!(config.policies.default.values.idle, 20);
        assert_eq!(config.policies.default_source, Source::CommandLine);
        let idles: Vec<u32> = config
            .policies
            .rules
            .iter()
            .map(|r| r.spec.unwrap().values.idle)
            .collect();
        assert_eq!(idles, [20, 7]);
    }

    #[test]
    fn scope_check_names_the_line() {
        let config = parse_ok("[[policy]]\ncgroup = \"other/x\"\n[[policy]]\ncgroup = \"*/y\"\n");
        let attach = CgroupPath::root().join("mine");
        let err = config.check_scope(&attach).unwrap_err();
        let Error::Config { line, reason, .. } = err.downcast::<Error>().unwrap() else {
            panic!("config error");
        };
        assert_eq!(line, Some(1));
        assert!(
            reason.contains("outside the attach cgroup /mine"),
            "{reason}"
        );
        assert!(config.check_scope(&CgroupPath::root()).is_ok());
    }

    #[test]
    fn scope_check_refuses_selectors_that_reach_only_above_the_attach_cgroup() {
        let attach = CgroupPath::root()
            .join("kubepods.slice")
            .join("besteffort.slice");
        let scope = |selector: &str| {
            parse_ok(&format!("[[policy]]\ncgroup = \"{selector}\"\n"))
                .check_scope(&attach)
                .is_ok()
        };
        // The attach cgroup, below it, and globs that can match either.
        for inside in [
            "kubepods.slice/besteffort.slice",
            "kubepods.slice/besteffort.slice/pod1",
            "kubepods.slice/*/pod*",
            "*/besteffort.slice",
            "kubepods.slice/besteffort.slice/*/*",
            "kubepods.slice/*",
        ] {
            assert!(scope(inside), "{inside}");
        }
        // An ancestor: the program's walk stops at the attach cgroup, so its policy would never
        // apply. Globs too shallow, or whose components cannot match the attach path.
        for outside in [
            "kubepods.slice",
            "/",
            "kubepods.slice/burstable.slice/pod1",
            "*.slice",
            "kubepods.slice/burstable*/*",
            "system.slice/*/*",
        ] {
            assert!(!scope(outside), "{outside}");
        }
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        /// Fragments that steer random input towards almost-valid configs, where a parser is
        /// most likely to trip.
        fn fragment() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("[default]\n".to_owned()),
                Just("[[policy]]\n".to_owned()),
                Just("[default\n".to_owned()),
                "(attach|state_dir|metrics|cgroup|mode|idle|interval|count|user_timeout|max_tracked_cgroups|max_tracked_sockets|x) = ".prop_map(|k| k),
                "\"[a-z0-9/*?\\[\\]. :ms]{0,12}\"\n",
                "-?[0-9]{1,20}\n",
                Just("true\n".to_owned()),
                Just("[1, 2]\n".to_owned()),
                Just("{ a = 1 }\n".to_owned()),
                "\\PC{0,8}",
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn never_panics_on_arbitrary_text(text in "\\PC{0,300}") {
                let _ = parse(&text, Path::new("/fuzz.toml"), &cg());
            }

            #[test]
            fn never_panics_on_config_shaped_text(parts in proptest::collection::vec(fragment(), 0..24)) {
                let text = parts.concat();
                if let Err(err) = parse(&text, Path::new("/fuzz.toml"), &cg()) {
                    // Every rejection names the file.
                    prop_assert!(err.to_string().starts_with("/fuzz.toml"), "{}", err);
                }
            }
        }
    }

    #[test]
    fn bytes_that_are_not_utf8_are_named_by_line() {
        let file = std::env::temp_dir().join(format!("ka-notutf8-{}.toml", std::process::id()));
        std::fs::write(&file, b"[default]\nidle = 30 # caf\xe9\n").unwrap();
        let err = load(Some(&file), &cg()).unwrap_err();
        std::fs::remove_file(&file).unwrap();
        assert_eq!(
            err.to_string(),
            format!(
                "{}:2: not UTF-8 text (byte 16 of the line); write the config as UTF-8",
                file.display()
            )
        );
        assert_eq!(crate::error::code_of(&err), Some(2));
        // The first line, and the first byte of it.
        let err = not_utf8(Path::new("/c.toml"), b"\xff", 0);
        assert_eq!(
            err.to_string(),
            "/c.toml:1: not UTF-8 text (byte 1 of the line); write the config as UTF-8"
        );
    }

    #[test]
    fn a_missing_explicit_file_is_an_error() {
        let missing = Path::new("/nonexistent/keepalive.toml");
        let err = load(Some(missing), &cg()).unwrap_err();
        assert!(err.to_string().contains("cannot read"), "{err}");
    }
}
