//! `status`: what the enforcer is doing, read from pinned state only.
//!
//! Sockets come from the pinned status iterator (one record per enforced socket that is still
//! open, with live TCP state), per-cgroup counters from `KA_CGSTATS`, event counters from
//! `KA_COUNTERS`. Nothing is loaded or attached to read them, so `status` works the same
//! whether or not the agent is running.

use std::{
    cell::OnceCell,
    collections::{BTreeMap, HashMap, HashSet},
    io::{self, Read as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    path::Path,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray};
use comfy_table::{Cell, CellAlignment, ContentArrangement, Table, presets};
use keepalive_common::{
    CgroupStats, Counter, MAP_CGSTATS, MAP_COUNTERS, MAP_SOCKS, SockRecord, StatusRecord,
    sock_flags, uapi,
};
use serde::Serialize;

use crate::{
    cgroup::{Cgroup2, CgroupPath},
    error::Error,
    pin::StateDir,
    policy::{Mode, Selector},
    sys,
};

/// One enforced socket.
#[derive(Debug, Clone, Serialize)]
pub struct SocketRow {
    /// Local address, IPv6 as `[addr]:port`.
    pub local: String,
    /// Remote address.
    pub remote: String,
    /// `ipv4` or `ipv6` (v4-mapped addresses are `ipv6`).
    pub family: &'static str,
    /// `outbound`, `inbound`, or `unknown` (connections that existed before enforcement).
    pub direction: &'static str,
    /// TCP state.
    pub state: &'static str,
    /// The socket's own cgroup, relative to the cgroup2 mount.
    pub cgroup: String,
    /// Its id.
    pub cgroup_id: u64,
    /// The cgroup whose policy applied, or `default`.
    pub policy_cgroup: String,
    /// TCP_KEEPIDLE, seconds.
    pub idle: u32,
    /// TCP_KEEPINTVL, seconds.
    pub interval: u32,
    /// TCP_KEEPCNT.
    pub count: u32,
    /// TCP_USER_TIMEOUT, milliseconds; null when left to the kernel.
    pub user_timeout: Option<u32>,
    /// Policy mode; `off` for a socket the program configured before its cgroup became `off`.
    pub mode: &'static str,
    /// `fill` found keepalive enabled by the application and kept its values.
    pub app_owned: bool,
    /// `lock`: setsockopt calls are held at the policy.
    pub locked: bool,
    /// The connection existed before the policy and was updated in place.
    pub retroactive: bool,
    /// The socket already carried the policy's values, so no setsockopt call was needed:
    /// usually an accepted socket that inherited them from its listener.
    pub inherited: bool,
    /// A bpf_setsockopt call failed on this socket.
    pub setsockopt_failed: bool,
    /// Process that called connect(); null when unknown (accepted or pre-existing sockets).
    pub pid: Option<u32>,
    /// Its command name.
    pub comm: Option<String>,
    /// When the connection was established (RFC 3339); null for pre-existing connections.
    pub established_at: Option<String>,
    /// When the current policy was applied (RFC 3339).
    pub enforced_at: String,
    /// Keepalive probes sent and not answered yet.
    pub probes_out: u8,
}

/// Per-cgroup counters.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CgroupRow {
    /// cgroup path, or `#<id> (removed)`.
    pub cgroup: String,
    /// cgroup id.
    pub cgroup_id: u64,
    /// Enforced sockets open now (tracked ones; see `tracked_entries`).
    pub open: u64,
    /// Sockets enforced since the maps were created.
    pub enforced_total: u64,
    /// Connections closed because keepalive or the user timeout expired.
    pub dead_peers: u64,
}

/// Everything `status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Where the sock_ops program is attached.
    pub attach_cgroup: Option<String>,
    /// The state directory.
    pub state_dir: String,
    /// Enforced sockets that are open.
    pub sockets: Vec<SocketRow>,
    /// Per-cgroup counters.
    pub cgroups: Vec<CgroupRow>,
    /// Event counters (see the README for each).
    pub counters: BTreeMap<&'static str, u64>,
    /// Entries in the socket tracking map: enforced sockets plus connects in progress.
    pub tracked_entries: u64,
    /// Entries whose socket is gone without the program seeing it close (should stay 0).
    pub stale_entries: u64,
}

/// `status` filters.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only sockets and cgroups at or below the cgroups this selects.
    pub cgroup: Option<Selector>,
    /// Only sockets with this local or remote port.
    pub port: Option<u16>,
}

fn open_pinned_map(state: &StateDir, name: &str) -> anyhow::Result<Map> {
    let path = state.map(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("failed to open {}", path.display()))
        .map_err(|err| pin_error(&path, err))?;
    Map::from_map_data(data).with_context(|| format!("unexpected map at {}", path.display()))
}

/// Refuses a state directory keepalive can never have pinned anything in (a typo, or the
/// bpffs mount itself), and one that does not exist, each named as such: "not attached" would
/// invite starting a second agent.
pub fn check_state_dir(state: &StateDir) -> anyhow::Result<()> {
    // Not root: the directory cannot be read, which says so (exit 3).
    state
        .check_own()
        .map_err(|err| pin_error(state.root(), err))?;
    if crate::pin::bpffs_state(state.root()).is_err() {
        return Err(Error::Bpffs(format!(
            "state directory {}{} is not on a bpf filesystem, so nothing keepalive pins can be \
             there; give the state directory the agent runs with (default {})",
            state.root().display(),
            state.named_at(),
            crate::pin::DEFAULT_STATE_DIR
        ))
        .into());
    }
    // `exists` would take a directory this process may not look into (its parent's mode) for
    // one that does not exist, and tell a user without root that nothing is attached.
    let missing = match std::fs::metadata(state.root()) {
        Ok(_) => false,
        Err(err) if err.kind() == io::ErrorKind::NotFound => true,
        Err(err) => return Err(pin_error(state.root(), err.into())),
    };
    if missing {
        return Err(Error::Agent(format!(
            "nothing is pinned at {}{}: the directory does not exist, so keepalive is not \
             attached with this state directory (start it with `keepalive-agent run`, or give \
             the state directory the agent runs with)",
            state.root().display(),
            state.named_at()
        ))
        .into());
    }
    Ok(())
}

/// Turns a failure to open pinned state at `path` into the operator's error when the first
/// I/O error in its chain says why: not root (exit 3) or nothing pinned (exit 7). Any other
/// failure is returned as it is.
fn pin_error(path: &Path, err: anyhow::Error) -> anyhow::Error {
    let io = err
        .chain()
        .find_map(|cause| cause.downcast_ref::<io::Error>())
        .map(io::Error::kind);
    match io {
        Some(io::ErrorKind::PermissionDenied) => Error::Permission(format!(
            "permission denied reading {}: keepalive state is readable by root only",
            path.display()
        ))
        .into(),
        Some(io::ErrorKind::NotFound) => Error::Agent(format!(
            "nothing is pinned at {}; keepalive is not attached (start it with `keepalive-agent run`)",
            path.display()
        ))
        .into(),
        _ => err,
    }
}

/// Reads the event counters, summed over CPUs.
pub fn read_counters(state: &StateDir) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    Tables::open(state)?.counters()
}

/// The pinned maps `status` reads besides the records, opened together with those before
/// anything is shown: a `detach` meanwhile removes the pins, not the maps held open here.
struct Tables {
    cgstats: BpfHashMap<MapData, u64, CgroupStats>,
    counters: PerCpuArray<MapData, u64>,
}

impl Tables {
    fn open(state: &StateDir) -> anyhow::Result<Self> {
        Ok(Self {
            cgstats: open_pinned_map(state, MAP_CGSTATS)?.try_into()?,
            counters: open_pinned_map(state, MAP_COUNTERS)?.try_into()?,
        })
    }

    fn cgroup_stats(&self) -> anyhow::Result<HashMap<u64, CgroupStats>> {
        let mut out = HashMap::new();
        for entry in self.cgstats.iter() {
            let (id, stats) = entry.context("failed to read KA_CGSTATS")?;
            out.insert(id, stats);
        }
        Ok(out)
    }

    fn counters(&self) -> anyhow::Result<BTreeMap<&'static str, u64>> {
        let mut out = BTreeMap::new();
        for counter in Counter::ALL {
            let values = self
                .counters
                .get(&(counter as u32), 0)
                .with_context(|| format!("failed to read counter {}", counter.name()))?;
            out.insert(counter.name(), values.iter().sum());
        }
        Ok(out)
    }
}

/// The pinned status iterators, started; [`each_record`] reads them.
struct Records(Vec<io::BufReader<std::fs::File>>);

/// Starts the status iterators: the one over the slot table, then the one over the hash.
/// Pins of an agent from before the slot table have only the second, which then holds every
/// record.
fn open_records(state: &StateDir) -> anyhow::Result<Records> {
    let open = |path: &Path| match sys::obj_get(path) {
        Ok(link) => Ok(link),
        // An agent that died between attaching and pinning the iterators left enforcement
        // without them: attached, only not listable.
        Err(err) if err.kind() == io::ErrorKind::NotFound && state.sockops_link().exists() => {
            Err(Error::Agent(format!(
                "keepalive's enforcement is pinned at {}, but its status iterator at {} is not: \
                 an agent's start did not finish; starting the agent pins it",
                state.sockops_link().display(),
                path.display()
            ))
            .into())
        }
        Err(err) => Err(pin_error(
            path,
            anyhow::Error::new(err).context(format!("failed to open {}", path.display())),
        )),
    };
    let start = |link: std::os::fd::OwnedFd| -> anyhow::Result<io::BufReader<std::fs::File>> {
        let file = sys::iter_create(link.as_fd()).context("failed to start the status iterator")?;
        Ok(io::BufReader::with_capacity(1 << 20, file))
    };
    let hash = open(&state.status_link())?;
    let slots = state.status_slots_link();
    let mut readers = Vec::with_capacity(2);
    if slots.exists() {
        readers.push(start(open(&slots)?)?);
        // The hash holds only sockets whose slots were all taken, so it is empty on most hosts,
        // and its iterator runs once per bucket even then: about 6 ms at the default size.
        // BPF_MAP_GET_NEXT_KEY finds the first entry with a plain scan of the buckets in the
        // kernel, a fraction of that (it grows with max_tracked_sockets all the same).
        if hash_is_empty(state) {
            return Ok(Records(readers));
        }
    }
    readers.push(start(hash)?);
    Ok(Records(readers))
}

/// Whether the pinned `KA_SOCKS` hash has no entries; false when it cannot be read, so the
/// iterator runs and reports what is there.
fn hash_is_empty(state: &StateDir) -> bool {
    let Ok(map) = open_pinned_map(state, MAP_SOCKS) else {
        return false;
    };
    let Ok(map) = BpfHashMap::<MapData, u64, [u8; size_of::<SockRecord>()]>::try_from(map) else {
        return false;
    };
    map.keys().next().is_none()
}

/// Calls `each` for every raw socket record of started status iterators, streaming: memory
/// does not grow with the number of sockets.
fn each_record(records: Records, mut each: impl FnMut(&StatusRecord)) -> anyhow::Result<()> {
    let mut buf = [0u8; size_of::<StatusRecord>()];
    for mut reader in records.0 {
        loop {
            match reader.read_exact(&mut buf) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(err) => return Err(err).context("failed to read the status iterator"),
            }
            // SAFETY: StatusRecord is plain old data and the buffer has exactly its size.
            let rec = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<StatusRecord>()) };
            each(&rec);
        }
    }
    Ok(())
}

fn clock_now(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills `ts`.
    unsafe { libc::clock_gettime(clock, &raw mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn nanos(time: Duration) -> u64 {
    u64::try_from(time.as_nanos()).unwrap_or(u64::MAX)
}

/// CLOCK_BOOTTIME now, in nanoseconds.
pub fn boottime_now_ns() -> u64 {
    nanos(clock_now(libc::CLOCK_BOOTTIME))
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock the program stamps records with, read
/// precisely by the apply pass (`bpf_ktime_get_ns`) and to a timer tick for new connections
/// (`bpf_ktime_get_coarse_ns`). Marks the start of an apply pass: every stamp that pass takes is
/// at or above it, and stamps of an earlier pass are below it.
pub fn monotonic_now_ns() -> u64 {
    nanos(clock_now(libc::CLOCK_MONOTONIC))
}

/// The wall-clock time of CLOCK_MONOTONIC zero, to turn the program's timestamps into
/// wall-clock time with no clock read per socket. Time a host spent suspended is not in
/// CLOCK_MONOTONIC, so a stamp from before a suspend converts to a time later by its length.
fn stamp_epoch() -> SystemTime {
    SystemTime::now() - clock_now(libc::CLOCK_MONOTONIC)
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

fn addr(family: u16, bytes: [u8; 16], port: u16) -> String {
    let ip = if family == uapi::AF_INET6 {
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    };
    SocketAddr::new(ip, port).to_string()
}

fn tcp_state(state: u8) -> &'static str {
    match state {
        1 => "established",
        2 => "syn-sent",
        3 => "syn-recv",
        4 => "fin-wait-1",
        5 => "fin-wait-2",
        6 => "time-wait",
        7 => "close",
        8 => "close-wait",
        9 => "last-ack",
        10 => "listen",
        11 => "closing",
        _ => "unknown",
    }
}

/// The cgroups' paths by id. The tree is listed before the records are read, so a record can
/// name a cgroup created in between: the first id not found has the tree listed once more,
/// rather than a cgroup that exists shown as removed.
struct Names<'a> {
    cgroup2: &'a Cgroup2,
    first: HashMap<u64, CgroupPath>,
    /// The second listing, made at the first miss.
    again: OnceCell<HashMap<u64, CgroupPath>>,
}

impl<'a> Names<'a> {
    fn new(cgroup2: &'a Cgroup2) -> Self {
        Self {
            cgroup2,
            first: cgroup2.names(&CgroupPath::root()),
            again: OnceCell::new(),
        }
    }

    /// The path of cgroup `id`; `None` when it does not exist (any more).
    fn get(&self, id: u64) -> Option<&CgroupPath> {
        if let Some(path) = self.first.get(&id) {
            return Some(path);
        }
        if id == 0 {
            return None;
        }
        self.again
            .get_or_init(|| self.cgroup2.names(&CgroupPath::root()))
            .get(&id)
    }

    /// Whether `id` was not in the first listing: a cgroup created since, or one removed.
    fn unlisted(&self, id: u64) -> bool {
        !self.first.contains_key(&id)
    }

    /// How `status` shows cgroup `id`.
    fn show(&self, id: u64) -> String {
        match self.get(id) {
            Some(path) => path.to_string(),
            None if id == 0 => "(unknown)".to_owned(),
            None => removed_name(id),
        }
    }
}

/// How `status` shows cgroup `id` once it has been removed.
pub(crate) fn removed_name(id: u64) -> String {
    format!("#{id} (removed)")
}

fn socket_row(rec: &StatusRecord, names: &Names<'_>, stamp_epoch: SystemTime) -> SocketRow {
    let wall_time = |ns| stamp_epoch + Duration::from_nanos(ns);
    let sock = &rec.sock;
    let state = rec.live_state;
    let flags = sock.flags;
    let policy = sock.policy;
    let has = |bit| flags & bit != 0;
    let comm_len = sock
        .comm
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(sock.comm.len());
    let retroactive = has(sock_flags::RETROACTIVE);
    let enforced_at = wall_time(sock.applied_ns);
    SocketRow {
        local: addr(sock.family, sock.local_addr, sock.local_port),
        remote: addr(sock.family, sock.remote_addr, sock.remote_port),
        family: if sock.family == uapi::AF_INET6 {
            "ipv6"
        } else {
            "ipv4"
        },
        direction: if has(sock_flags::OUTBOUND) {
            "outbound"
        } else if has(sock_flags::INBOUND) {
            "inbound"
        } else {
            "unknown"
        },
        state: tcp_state(state),
        cgroup: names.show(sock.cgroup_id),
        cgroup_id: sock.cgroup_id,
        policy_cgroup: if sock.policy_cgroup_id == keepalive_common::DEFAULT_POLICY_KEY {
            "default".to_owned()
        } else {
            names.show(sock.policy_cgroup_id)
        },
        idle: policy.idle,
        interval: policy.interval,
        count: policy.count,
        user_timeout: (policy.flags & keepalive_common::policy_flags::USER_TIMEOUT != 0)
            .then_some(policy.user_timeout_ms),
        mode: Mode::from_abi(policy.mode).map_or("unknown", Mode::as_str),
        app_owned: has(sock_flags::APP_OWNED),
        locked: has(sock_flags::LOCKED),
        retroactive,
        inherited: has(sock_flags::INHERITED),
        setsockopt_failed: has(sock_flags::SETSOCKOPT_FAILED),
        pid: has(sock_flags::HAS_TASK).then_some(sock.pid),
        comm: has(sock_flags::HAS_TASK)
            .then(|| String::from_utf8_lossy(&sock.comm[..comm_len]).into_owned()),
        established_at: (sock.established_ns != 0).then(|| rfc3339(wall_time(sock.established_ns))),
        enforced_at: rfc3339(enforced_at),
        probes_out: rec.probes_out,
    }
}

/// What every view needs: cgroup names, the filter, where the state is, and the boot epoch
/// for timestamps.
struct View<'a> {
    names: Names<'a>,
    filter: &'a Filter,
    /// The cgroups of the first listing the filter's `cgroup` covers, found once rather than
    /// per socket.
    selected: Option<HashSet<u64>>,
    attach_cgroup: Option<String>,
    stamp_epoch: SystemTime,
}

impl View<'_> {
    fn new<'f>(
        state: &StateDir,
        cgroup2: &'f Cgroup2,
        filter: &'f Filter,
    ) -> anyhow::Result<View<'f>> {
        let names = Names::new(cgroup2);
        // `/` covers every cgroup, also those removed since, whose place nothing tells.
        let everything = |selector: &&Selector| selector.covers(&CgroupPath::root());
        let selected = filter
            .cgroup
            .as_ref()
            .filter(|s| !everything(s))
            .map(|selector| {
                let selected: HashSet<u64> = names
                    .first
                    .iter()
                    .filter(|(_, path)| selector.covers(path))
                    .map(|(id, _)| *id)
                    .collect();
                // A filter is no error, but a typo should not pass as "no sockets".
                if selected.is_empty() {
                    log::warn!("no cgroup matches {}", selector.text());
                }
                selected
            });
        let attach_id =
            crate::loader::pinned_attach_id(state).map_err(|err| pin_error(state.root(), err))?;
        // The link of a removed cgroup no longer covers new connections (only sockets left
        // over from that cgroup, which keep its programs): not attached, whatever is pinned.
        let attach_cgroup = attach_id
            .and_then(|id| names.get(id))
            .map(ToString::to_string);
        if attach_id.is_some() && attach_cgroup.is_none() {
            log::warn!(
                "the enforcement pinned in {} is on a cgroup that has been removed: it no longer \
                 covers new connections, only sockets left over from that cgroup; start the agent \
                 again once that cgroup exists again (or with another), or remove it with `{}`",
                state.root().display(),
                state.detach_command()
            );
        }
        Ok(View {
            names,
            filter,
            selected,
            attach_cgroup,
            stamp_epoch: stamp_epoch(),
        })
    }

    fn socket_row(&self, rec: &StatusRecord) -> SocketRow {
        socket_row(rec, &self.names, self.stamp_epoch)
    }

    fn within(&self, id: u64) -> bool {
        let Some(selected) = &self.selected else {
            return true;
        };
        // A cgroup created since the first listing is judged by its path.
        selected.contains(&id)
            || (self.names.unlisted(id)
                && self.filter.cgroup.as_ref().is_some_and(|selector| {
                    self.names.get(id).is_some_and(|path| selector.covers(path))
                }))
    }

    /// Whether a record is an open enforced socket that passes the filter.
    fn shows(&self, rec: &StatusRecord) -> bool {
        rec.sock.flags & COVERED != 0
            && rec.live_state != 0
            && self.within(rec.sock.cgroup_id)
            && self
                .filter
                .port
                .is_none_or(|port| rec.sock.local_port == port || rec.sock.remote_port == port)
    }
}

const COVERED: u32 = sock_flags::ENFORCED | sock_flags::APP_OWNED;

/// Per-record tallies: open sockets per cgroup, all entries, stale entries.
#[derive(Default)]
struct Tally {
    open: HashMap<u64, u64>,
    tracked: u64,
    stale: u64,
}

impl Tally {
    fn add(&mut self, rec: &StatusRecord) {
        self.tracked += 1;
        if rec.sock.flags & COVERED != 0 {
            if rec.live_state == 0 {
                self.stale += 1;
            } else {
                *self.open.entry(rec.sock.cgroup_id).or_default() += 1;
            }
        }
    }

    fn cgroups(&self, view: &View<'_>, tables: &Tables) -> anyhow::Result<Vec<CgroupRow>> {
        let stats = tables.cgroup_stats()?;
        let mut ids: Vec<u64> = stats.keys().chain(self.open.keys()).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        let mut rows: Vec<CgroupRow> = ids
            .into_iter()
            .filter(|id| view.within(*id))
            .map(|id| {
                let counted = stats.get(&id).copied().unwrap_or_default();
                CgroupRow {
                    cgroup: view.names.show(id),
                    cgroup_id: id,
                    open: self.open.get(&id).copied().unwrap_or(0),
                    enforced_total: counted.enforced_total,
                    dead_peers: counted.dead_peers,
                }
            })
            .collect();
        rows.sort_by(|a, b| a.cgroup.cmp(&b.cgroup));
        Ok(rows)
    }
}

/// Per-cgroup rows and counters without socket rows: what metrics need, cheap at any size.
pub fn summary(state: &StateDir, cgroup2: &Cgroup2) -> anyhow::Result<Snapshot> {
    let filter = Filter::default();
    let view = View::new(state, cgroup2, &filter)?;
    let records = open_records(state)?;
    let tables = Tables::open(state)?;
    let mut tally = Tally::default();
    each_record(records, |rec| tally.add(rec))?;
    Ok(Snapshot {
        attach_cgroup: view.attach_cgroup.clone(),
        state_dir: state.root().display().to_string(),
        sockets: Vec::new(),
        cgroups: tally.cgroups(&view, &tables)?,
        counters: tables.counters()?,
        tracked_entries: tally.tracked,
        stale_entries: tally.stale,
    })
}

/// Writes the same document as a serialized [`Snapshot`], streaming the sockets in the order
/// the kernel returns them, so memory stays flat however many sockets are open.
pub fn write_json(
    state: &StateDir,
    cgroup2: &Cgroup2,
    filter: &Filter,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let view = View::new(state, cgroup2, filter)?;
    // Opened before anything is written, so "not attached" leaves no partial document, nor
    // does a `detach` while the sockets are written.
    let records = open_records(state)?;
    let tables = Tables::open(state)?;
    let mut tally = Tally::default();
    write!(out, "{{\"attach_cgroup\":")?;
    serde_json::to_writer(&mut *out, &view.attach_cgroup)?;
    write!(out, ",\"state_dir\":")?;
    serde_json::to_writer(&mut *out, &state.root().display().to_string())?;
    write!(out, ",\"sockets\":[")?;
    let mut first = true;
    let mut failed = None;
    each_record(records, |rec| {
        tally.add(rec);
        if failed.is_some() || !view.shows(rec) {
            return;
        }
        let sep = if first { "" } else { "," };
        first = false;
        if let Err(err) = out
            .write_all(sep.as_bytes())
            .map_err(serde_json::Error::io)
            .and_then(|()| serde_json::to_writer(&mut *out, &view.socket_row(rec)))
        {
            failed = Some(err);
        }
    })?;
    if let Some(err) = failed {
        return Err(err.into());
    }
    write!(out, "],\"cgroups\":")?;
    serde_json::to_writer(&mut *out, &tally.cgroups(&view, &tables)?)?;
    write!(out, ",\"counters\":")?;
    serde_json::to_writer(&mut *out, &tables.counters()?)?;
    writeln!(
        out,
        ",\"tracked_entries\":{},\"stale_entries\":{}}}",
        tally.tracked, tally.stale
    )?;
    Ok(())
}

/// A table as wide as its cells, as the socket rows are: wrapped to the terminal, a long
/// cgroup path would go on over lines that read as rows of their own.
fn table(headers: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_content_arrangement(ContentArrangement::Disabled);
    table.set_header(headers.iter().map(Cell::new));
    table
}

/// A table's lines without the padding its last column leaves at their ends, each ending in
/// a line break, as the socket table's lines are written.
pub(crate) fn table_text(table: &Table) -> String {
    table
        .lines()
        .map(|line| format!("{}\n", line.trim_end()))
        .collect()
}

/// A duration as one word (`1m30s`, not humantime's `1m 30s`), so a cell never holds a space
/// that reads as a column break; humantime parses it back, as the config and the flags do.
pub(crate) fn duration_cell(value: Duration) -> String {
    humantime::format_duration(value)
        .to_string()
        .replace(' ', "")
}

/// Human output: aligned columns, sockets sorted by cgroup and address, then the per-cgroup
/// summary. Written as it is made: the sockets are kept as one compact line each (see
/// [`SocketLines`]), not as table cells, which took some 4 KiB per socket.
pub fn write_table(
    state: &StateDir,
    cgroup2: &Cgroup2,
    filter: &Filter,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let view = View::new(state, cgroup2, filter)?;
    let records = open_records(state)?;
    let tables = Tables::open(state)?;
    let mut tally = Tally::default();
    let mut lines = SocketLines::default();
    each_record(records, |rec| {
        tally.add(rec);
        if view.shows(rec) {
            lines.add(&view.socket_row(rec));
        }
    })?;
    let cgroups = tally.cgroups(&view, &tables)?;
    let counters = tables.counters()?;
    match &view.attach_cgroup {
        Some(cgroup) => writeln!(
            out,
            "attached at {cgroup} (state {})\n",
            state.root().display()
        )?,
        None => writeln!(
            out,
            "not attached (state {}); counters are from the last run\n",
            state.root().display()
        )?,
    }
    if lines.rows.is_empty() {
        out.write_all(no_sockets(filter).as_bytes())?;
    } else {
        lines.write(out)?;
    }
    out.write_all(summary_text(&cgroups, &counters).as_bytes())?;
    Ok(())
}

/// What the socket table says when it has no rows.
fn no_sockets(filter: &Filter) -> &'static str {
    if filter.cgroup.is_some() || filter.port.is_some() {
        "no enforced sockets that match the filter are open\n"
    } else {
        "no enforced sockets are open\n"
    }
}

/// The socket table's columns, in order, and whether each is aligned right.
const SOCKET_COLUMNS: [(&str, bool); 12] = [
    ("LOCAL", false),
    ("REMOTE", false),
    ("DIR", false),
    ("CGROUP", false),
    ("IDLE", false),
    ("INTVL", false),
    ("CNT", true),
    ("USER-TIMEOUT", false),
    ("MODE", false),
    ("PROCESS", false),
    ("SINCE", false),
    ("PROBES", true),
];

/// Columns of the sort key, first to last: cgroup, local address, remote address.
const SORT_COLUMNS: [usize; 3] = [3, 0, 1];

/// The socket rows, each one line of its cells joined by NUL (which no cell holds), the sort
/// key's cells first, with both addresses as numbers ([`addr_key`]). A few hundred bytes a
/// socket, where `status --json` streams in constant memory.
#[derive(Default)]
struct SocketLines {
    rows: Vec<(Box<str>, [u8; 36])>,
    /// Each column's width so far, in characters.
    widths: [usize; SOCKET_COLUMNS.len()],
}

impl SocketLines {
    fn add(&mut self, row: &SocketRow) {
        let cells = socket_cells(row);
        for (width, cell) in self.widths.iter_mut().zip(&cells) {
            *width = (*width).max(cell.chars().count());
        }
        let rest = (0..cells.len()).filter(|i| !SORT_COLUMNS.contains(i));
        let line: Vec<&str> = SORT_COLUMNS
            .into_iter()
            .chain(rest)
            .map(|i| cells[i].as_str())
            .collect();
        let mut key = [0; 36];
        key[..18].copy_from_slice(&addr_key(&row.local));
        key[18..].copy_from_slice(&addr_key(&row.remote));
        self.rows.push((line.join("\0").into_boxed_str(), key));
    }

    /// Sorts the rows, by cgroup and then by address as numbers (`10.0.0.9` before
    /// `10.0.0.10`, port 999 before 1000), and writes them under the header, columns aligned
    /// as the summary's.
    fn write(mut self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        self.rows.sort_unstable_by(|(a, a_key), (b, b_key)| {
            let (a_cgroup, b_cgroup) = (a.split('\0').next(), b.split('\0').next());
            a_cgroup
                .cmp(&b_cgroup)
                .then(a_key.cmp(b_key))
                .then(a.cmp(b))
        });
        let mut widths = self.widths;
        for (width, (header, _)) in widths.iter_mut().zip(SOCKET_COLUMNS) {
            *width = (*width).max(header.len());
        }
        let mut line = String::new();
        let mut write_line = |cells: &[&str], out: &mut dyn std::io::Write| {
            line.clear();
            for ((cell, width), (_, right)) in cells.iter().zip(widths).zip(SOCKET_COLUMNS) {
                let pad = width.saturating_sub(cell.chars().count());
                line.push(' ');
                if right {
                    line.extend(std::iter::repeat_n(' ', pad));
                }
                line.push_str(cell);
                if !right {
                    line.extend(std::iter::repeat_n(' ', pad));
                }
                line.push(' ');
            }
            writeln!(out, "{}", line.trim_end())
        };
        let headers = SOCKET_COLUMNS.map(|(header, _)| header);
        write_line(&headers, out)?;
        let mut cells = [""; SOCKET_COLUMNS.len()];
        let order: Vec<usize> = SORT_COLUMNS
            .into_iter()
            .chain((0..cells.len()).filter(|i| !SORT_COLUMNS.contains(i)))
            .collect();
        for (row, _) in &self.rows {
            for (&column, cell) in order.iter().zip(row.split('\0')) {
                cells[column] = cell;
            }
            write_line(&cells, out)?;
        }
        Ok(())
    }
}

/// `text` as a table cell for a terminal: control characters as Rust escapes (`\n`,
/// `\u{1b}`). Any process can put them in its name, and a user in the names of the cgroups
/// delegated to them; raw, they could break a row in two, forge another, or move the cursor.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.into()
}

/// `text` for a terminal as [`printable`] makes it, line by line: a message's own line breaks
/// stay, and the cgroup paths it names cannot drive the terminal.
pub fn printable_lines(text: &str) -> String {
    text.split('\n')
        .map(printable)
        .collect::<Vec<_>>()
        .join("\n")
}

/// An address of [`addr`]'s as it sorts: the IPv6 address (IPv4 as v4-mapped), then the
/// port, both big-endian.
fn addr_key(text: &str) -> [u8; 18] {
    let mut key = [0; 18];
    if let Ok(addr) = text.parse::<SocketAddr>() {
        let ip = match addr.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        key[..16].copy_from_slice(&ip.octets());
        key[16..].copy_from_slice(&addr.port().to_be_bytes());
    }
    key
}

/// A socket's cells, in the order of [`SOCKET_COLUMNS`].
fn socket_cells(s: &SocketRow) -> [String; SOCKET_COLUMNS.len()] {
    let mode = if s.app_owned {
        format!("{} (app)", s.mode)
    } else {
        s.mode.to_owned()
    };
    let process = match (&s.pid, &s.comm) {
        (Some(pid), Some(comm)) => format!("{pid}/{}", printable(comm)),
        _ => "unknown".to_owned(),
    };
    let since = s
        .established_at
        .clone()
        .unwrap_or_else(|| format!("before {}", s.enforced_at));
    [
        s.local.clone(),
        s.remote.clone(),
        match s.direction {
            "outbound" => "out",
            "inbound" => "in",
            _ => "?",
        }
        .to_owned(),
        printable(&s.cgroup).into_owned(),
        duration_cell(Duration::from_secs(u64::from(s.idle))),
        duration_cell(Duration::from_secs(u64::from(s.interval))),
        s.count.to_string(),
        s.user_timeout.map_or("-".to_owned(), |ms| {
            duration_cell(Duration::from_millis(u64::from(ms)))
        }),
        mode,
        process,
        since,
        s.probes_out.to_string(),
    ]
}

/// The per-cgroup summary and warnings about counters, after the sockets.
fn summary_text(cgroups: &[CgroupRow], counters: &BTreeMap<&'static str, u64>) -> String {
    let mut out = String::from("\n");
    let mut t = table(&["CGROUP", "OPEN", "ENFORCED", "DEAD-PEERS"]);
    for c in cgroups {
        t.add_row(vec![
            Cell::new(printable(&c.cgroup)),
            Cell::new(c.open).set_alignment(CellAlignment::Right),
            Cell::new(c.enforced_total).set_alignment(CellAlignment::Right),
            Cell::new(c.dead_peers).set_alignment(CellAlignment::Right),
        ]);
    }
    out.push_str(&table_text(&t));
    let failures: u64 = counters
        .iter()
        .filter(|(name, _)| name.starts_with("setsockopt_failed"))
        .map(|(_, v)| v)
        .sum();
    let notes = [
        (failures, "setsockopt calls failed"),
        (
            counters
                .get(Counter::CgroupStatsFull.name())
                .copied()
                .unwrap_or(0),
            "enforcements not counted per cgroup (cgroup table full; raise max_tracked_cgroups)",
        ),
        (
            counters
                .get(Counter::TrackingFull.name())
                .copied()
                .unwrap_or(0),
            "sockets enforced but not listed (socket table full: raise max_tracked_sockets; \
             or, before Linux 6.12, connections that existed before the agent)",
        ),
    ];
    for (count, what) in notes {
        if count > 0 {
            out.push_str(&format!("\nwarning: {count} {what}"));
        }
    }
    if notes.iter().any(|(c, _)| *c > 0) {
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::MetadataExt as _};

    use super::*;
    use crate::error::{code_of, exit};

    /// A socket of a cgroup created after status listed the tree shows with its path, and
    /// passes a filter that covers it; a cgroup that does not exist shows as removed.
    #[test]
    fn a_cgroup_created_after_the_listing_shows_with_its_path() {
        let dir = std::env::temp_dir().join(format!("ka-names-{}", std::process::id()));
        fs::create_dir_all(dir.join("svc/old")).unwrap();
        let cgroup2 = Cgroup2::at(&dir);
        let filter = Filter {
            cgroup: Some(Selector::parse(&cgroup2, "svc/*").unwrap()),
            port: None,
        };
        let state = StateDir::new(dir.join("no-state"));
        let view = View::new(&state, &cgroup2, &filter).unwrap();
        let ino = |p: &str| fs::metadata(dir.join(p)).unwrap().ino();
        fs::create_dir_all(dir.join("svc/new")).unwrap();
        fs::create_dir_all(dir.join("other")).unwrap();
        let (old, new, other, svc) = (ino("svc/old"), ino("svc/new"), ino("other"), ino("svc"));
        let shown = [old, new, other, u64::MAX, 0].map(|id| view.names.show(id));
        let within = [old, new, other, svc, u64::MAX].map(|id| view.within(id));
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            shown,
            [
                "/svc/old".to_owned(),
                "/svc/new".to_owned(),
                "/other".to_owned(),
                format!("#{} (removed)", u64::MAX),
                "(unknown)".to_owned(),
            ],
            "listed again at the first miss"
        );
        assert_eq!(within, [true, true, false, false, false]);
    }

    #[test]
    fn no_sockets_under_a_filter_says_so() {
        assert_eq!(
            no_sockets(&Filter::default()),
            "no enforced sockets are open\n"
        );
        let port = Filter {
            port: Some(443),
            ..Filter::default()
        };
        assert_eq!(
            no_sockets(&port),
            "no enforced sockets that match the filter are open\n"
        );
    }

    #[test]
    fn the_socket_table_sorts_by_cgroup_and_address_and_aligns_its_columns() {
        let row = |cgroup: &str, local: &str, count: u32, pid: Option<u32>| SocketRow {
            local: local.to_owned(),
            remote: "127.0.0.1:80".to_owned(),
            family: "ipv4",
            direction: "outbound",
            state: "ESTABLISHED",
            cgroup: cgroup.to_owned(),
            cgroup_id: 1,
            policy_cgroup: "default".to_owned(),
            idle: 60,
            interval: 10,
            count,
            user_timeout: None,
            mode: "enforce",
            app_owned: false,
            locked: false,
            retroactive: false,
            inherited: false,
            setsockopt_failed: false,
            pid,
            comm: pid.map(|_| "curl".to_owned()),
            established_at: Some("2026-11-22T10:00:00Z".to_owned()),
            enforced_at: "2026-11-22T10:00:00Z".to_owned(),
            probes_out: 0,
        };
        let mut lines = SocketLines::default();
        lines.add(&row("/b", "127.0.0.1:1000", 5, None));
        lines.add(&row("/a.slice/long-service-name", "[::1]:2", 12, Some(7)));
        lines.add(&row("/b", "127.0.0.1:999", 5, Some(1234)));
        lines.add(&row("/b", "127.0.0.10:1", 5, None));
        lines.add(&row("/b", "127.0.0.9:1", 5, None));
        let mut out = Vec::new();
        lines.write(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        let column = |line: &str, cell: &str| {
            line.find(cell)
                .unwrap_or_else(|| panic!("{cell} in {line}"))
        };
        // Sorted by cgroup, then by local address as numbers.
        assert!(
            lines[1].contains("[::1]:2") && lines[1].contains("7/curl"),
            "{text}"
        );
        assert!(
            lines[2].contains("127.0.0.1:999") && lines[2].contains("1234/curl"),
            "{text}"
        );
        assert!(
            lines[3].contains("127.0.0.1:1000") && lines[3].contains("unknown"),
            "{text}"
        );
        assert!(lines[4].contains("127.0.0.9:1"), "{text}");
        assert!(lines[5].contains("127.0.0.10:1"), "{text}");
        // Left-aligned columns start together; CNT is aligned right.
        let cgroup = column(lines[0], "CGROUP");
        let mode = column(lines[0], "MODE");
        let count_end = column(lines[0], "CNT") + "CNT".len();
        for line in &lines[1..] {
            assert_eq!(column(line, "/"), cgroup, "{text}");
            assert_eq!(column(line, "enforce"), mode, "{text}");
        }
        assert_eq!(column(lines[1], "12 ") + 2, count_end, "{text}");
        assert_eq!(column(lines[2], " 5 ") + 2, count_end, "{text}");
        assert!(lines.iter().all(|l| !l.ends_with(' ')), "{text}");
    }

    #[test]
    fn nothing_pinned_is_not_attached_with_exit_7() {
        let root = std::env::temp_dir().join(format!("keepalive-no-state-{}", std::process::id()));
        assert!(!root.exists());
        let state = StateDir::new(&root);
        let cgroup2 = Cgroup2::at(&root);
        let filter = Filter::default();
        let failures = [
            ("write_table", {
                let mut out = Vec::new();
                let err = write_table(&state, &cgroup2, &filter, &mut out).err();
                assert!(out.is_empty(), "wrote {}", String::from_utf8_lossy(&out));
                err
            }),
            ("summary", summary(&state, &cgroup2).err()),
            ("write_json", {
                let mut out = Vec::new();
                let err = write_json(&state, &cgroup2, &filter, &mut out).err();
                assert!(
                    out.is_empty(),
                    "partial output: {}",
                    String::from_utf8_lossy(&out)
                );
                err
            }),
            ("read_counters", read_counters(&state).err()),
        ];
        for (what, err) in failures {
            let err = err.unwrap_or_else(|| panic!("{what} succeeded"));
            assert!(
                matches!(err.downcast_ref::<Error>(), Some(Error::Agent(_))),
                "{what}: {err:#}"
            );
            assert_eq!(code_of(&err), Some(exit::AGENT), "{what}: {err:#}");
            let text = format!("{err:#}");
            assert!(text.starts_with("nothing is pinned at "), "{what}: {text}");
            assert!(text.contains("keepalive is not attached"), "{what}: {text}");
        }
    }

    #[test]
    fn monotonic_stamps_convert_to_wall_clock_time() {
        let now = SystemTime::now();
        let converted = stamp_epoch() + Duration::from_nanos(monotonic_now_ns());
        let apart = converted
            .duration_since(now)
            .unwrap_or_else(|err| err.duration());
        assert!(apart < Duration::from_secs(1), "{apart:?}");
    }
}
