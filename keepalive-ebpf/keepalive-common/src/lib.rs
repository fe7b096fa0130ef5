//! The ABI shared by the BPF program and the agent: map and program names, pin layout, the
//! `#[repr(C)]` records stored in maps, and the kernel constants both sides use.
//!
//! Every struct here is explicitly sized, has no implicit padding and carries a compile-time size
//! assertion, so the two sides cannot drift apart silently.
#![cfg_attr(not(test), no_std)]

/// Bumped whenever a map's key or value layout changes. Pinned maps live in a directory named
/// after it, so an agent never reuses maps whose layout it does not understand.
///
/// Not bumped for [`sock_slot`]'s sequential first probe: newer agents find every record older
/// ones placed, and a bump would drop the pinned lock storage of `lock` sockets on upgrade.
/// Older agents miss records newer ones placed at the first probe; the README's "Downgrades"
/// says to detach first.
///
/// Not bumped for new flag bits ([`policy_flags::NEW_CGROUP`], [`policy_flags::APP_KEEPALIVE`],
/// [`sock_flags::APP_KEEPALIVE`], [`sock_flags::STATE_CB_HELD`]) either: layouts are unchanged, older programs ignore the
/// bits, and records and listener storage from older builds just lack them (their listeners'
/// own keepalive is then taken for the program's, as before). Nor for
/// [`policy_flags::SET_FAILED`] and [`policy_flags::APP_OWNED`], with one hazard on a
/// downgrade without `detach` (which the README advises against): an older program under
/// `fill` takes a listener marked [`policy_flags::APP_OWNED`] for one it configured, and
/// notes the marker's zero values for it, which an accepted connection with the application's
/// own keepalive at the kernel's defaults then matches, so a policy change replaces them.
/// Records from before [`sock_flags::STATE_CB_HELD`] lack it: a release of such a socket
/// switches its state callbacks off as before, also where another program had them on.
///
/// Nor for [`ListenPort::netns`], the key's former padding word: its size is unchanged, and
/// the entries older builds wrote (with 0 there) are just not found, as if never noted.
pub const ABI_VERSION: u32 = 2;

// ---------------------------------------------------------------------------------------------
// Program and map names (ELF symbol names in the BPF object).
// ---------------------------------------------------------------------------------------------

/// sock_ops program: enforces policy when a TCP socket reaches ESTABLISHED.
pub const PROG_SOCKOPS: &str = "keepalive_sockops";
/// cgroup/setsockopt program: keeps `lock`-mode sockets at their policy.
pub const PROG_LOCK: &str = "keepalive_lock";
/// iter/tcp program: applies policy to connections that already exist.
pub const PROG_APPLY: &str = "keepalive_apply";
/// iter/bpf_map_elem program over [`MAP_SOCKS`]: dumps the enforced sockets for `status`.
pub const PROG_STATUS: &str = "keepalive_status";
/// iter/bpf_map_elem program over [`MAP_SOCK_SLOTS`], the same for the slot table.
pub const PROG_STATUS_SLOTS: &str = "keepalive_status_slots";

/// Outer array-of-maps with one slot holding the active policy table
/// (`u64` cgroup id -> [`Policy`]). Swapping the slot replaces the whole table atomically.
pub const MAP_POLICY: &str = "KA_POLICY";
/// Tracked sockets, first table: an array of [`SockSlot`]s addressed by a hash of the socket
/// cookie ([`sock_slot`]). Claiming and freeing a slot takes no lock and no allocation, which
/// is most of what tracking costs per connection. A socket whose [`SOCK_SLOT_PROBES`] slots
/// are all taken goes to [`MAP_SOCKS`].
pub const MAP_SOCK_SLOTS: &str = "KA_SOCK_SLOTS";
/// What `status` iterates to read [`MAP_SOCK_SLOTS`]: one element per [`STATUS_CHUNK`] slots
/// (the element's value is unused). The iterator calls its program once per element, which
/// costs about 0.1 µs; once per slot that was 6 ms for the default table, however few sockets
/// were open. Not pinned: the status link holds it.
pub const MAP_SLOT_CHUNKS: &str = "KA_SLOT_CHUNKS";
/// Slots the status program reads per element of [`MAP_SLOT_CHUNKS`]. Their records (at most
/// 64 × 144 bytes) must fit the iterator's 32 KiB buffer.
pub const STATUS_CHUNK: u32 = 64;

/// Elements of [`MAP_SLOT_CHUNKS`] for a slot table of `slots` slots.
pub const fn slot_chunks_for(slots: u32) -> u32 {
    let chunks = slots.div_ceil(STATUS_CHUNK);
    if chunks == 0 { 1 } else { chunks }
}

/// Tracked sockets, second table: socket cookie (`u64`) -> [`SockRecord`], entries allocated
/// as needed. Records are added when a socket is enforced and removed when it closes. Bounded;
/// overflow is counted.
pub const MAP_SOCKS: &str = "KA_SOCKS";
/// Connect cache: [`CONNECT_SLOTS`] × [`ConnectSlot`]. Not pinned: in-flight connects across an
/// agent restart just show their process as unknown.
pub const MAP_CONNECTS: &str = "KA_CONNECTS";
/// Per-CPU cache of the sock_ops program's policy resolutions: [`RESOLVED_SLOTS`]
/// [`ResolvedSlot`]s per CPU, addressed by a hash of the socket's cgroup id
/// ([`resolved_slot`]). A hit saves the walk up the cgroup tree, one table lookup per level
/// (containers sit four or five levels below the root). Not pinned: a new program starts
/// empty.
pub const MAP_RESOLVED: &str = "KA_RESOLVED";
/// One `u64`: CLOCK_MONOTONIC nanoseconds when the current apply pass started, written by the
/// agent before each pass. A bpf iterator shows an object again when its output did not fit
/// the buffer; a socket already updated in this pass then reports the same result again
/// instead of "unchanged".
pub const MAP_APPLY: &str = "KA_APPLY";
/// Socket-local storage on listeners the program configured: the [`Policy`] it set. Lets a
/// policy change tell the program's keepalive on a listener from the application's, so `off`
/// and `fill` can undo or update it.
pub const MAP_LISTENERS: &str = "KA_LISTENERS";
/// The [`Policy`] the program last set on a listener, by the listener's cgroup id, port and
/// network namespace ([`ListenPort`]): what the connections it accepts inherit, where the listener's own
/// storage ([`MAP_LISTENERS`]) cannot be reached from. An accepted connection with keepalive
/// on and other values than its policy's, or with a user timeout its policy does not have
/// (also with keepalive off: the application switched it off on the listener), got them from
/// its listener; when they are these, they are what the program set before a policy
/// change reached the listener, which the new policy replaces (under `fill` too, where other
/// values are the application's). An LRU hash of
/// [`LISTEN_PORTS`] entries; one a listener left is harmless, at worst naming values an
/// application set as the program's.
pub const MAP_LISTEN_PORTS: &str = "KA_LISTEN_PORTS";
/// Capacity of [`MAP_LISTEN_PORTS`].
pub const LISTEN_PORTS: u32 = 8192;
/// Socket-local storage holding the [`Policy`] of `lock`-mode sockets, read by the
/// cgroup/setsockopt program (which has no socket cookie helper to find the tracking record).
pub const MAP_LOCKS: &str = "KA_LOCKS";
/// Socket-local storage holding the [`SockRecord`] of a socket the program enforced but could
/// not track: the tracking maps were full, or (before Linux 6.12) a connection older than the
/// agent could not get the close callback a record needs. `status` does not list these; the
/// record tells later apply passes what the program set, so they treat the socket as the
/// tracked ones (and count it once). Freed with the socket.
pub const MAP_UNTRACKED: &str = "KA_UNTRACKED";
/// Per-cgroup counters: `u64` cgroup id -> [`CgroupStats`]. Bounded; overflow is counted.
pub const MAP_CGSTATS: &str = "KA_CGSTATS";
/// Per-CPU `u64` counters indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "KA_COUNTERS";
/// What the agent keeps across its restarts, [`AGENT_SLOTS`] `u64`s; the programs never read
/// it. Slot [`AGENT_SEEN_CGROUPS`] holds the highest cgroup id the agent had seen below the
/// attach cgroup (cgroup ids only grow), so the next start can tell the cgroups created while
/// no agent ran. 0: no agent wrote it (a fresh map, or one from a build before it).
pub const MAP_AGENT: &str = "KA_AGENT";
/// Slots of [`MAP_AGENT`].
pub const AGENT_SLOTS: u32 = 1;
/// See [`MAP_AGENT`].
pub const AGENT_SEEN_CGROUPS: u32 = 0;
/// Name of the read-only global holding [`KernelOffsets`].
pub const GLOBAL_OFFSETS: &str = "KA_OFFSETS";
/// Name of the read-only global holding [`Settings`].
pub const GLOBAL_SETTINGS: &str = "KA_SETTINGS";

/// Maps pinned in the state directory, so counters and sockets survive an agent restart.
pub const PINNED_MAPS: [&str; 10] = [
    MAP_AGENT,
    MAP_POLICY,
    MAP_SOCK_SLOTS,
    MAP_SOCKS,
    MAP_LOCKS,
    MAP_LISTENERS,
    MAP_LISTEN_PORTS,
    MAP_UNTRACKED,
    MAP_CGSTATS,
    MAP_COUNTERS,
];

/// Capacity of one policy table. Configs with more policies are rejected.
pub const MAX_POLICIES: u32 = 16_384;
/// Default capacity of [`MAP_CGSTATS`]; the agent can shrink or grow it at load time.
pub const DEFAULT_MAX_TRACKED_CGROUPS: u32 = 65_536;
/// Default capacity of [`MAP_SOCKS`]: both ends of 256k connections. Entries are allocated as
/// needed, so an idle host uses next to nothing.
pub const DEFAULT_MAX_TRACKED_SOCKETS: u32 = 524_288;
/// Most slots in [`MAP_SOCK_SLOTS`] (preallocated: 136 bytes each, 8.5 MiB). The agent uses
/// the largest power of two not above this and `max_tracked_sockets`.
pub const MAX_SOCK_SLOTS: u32 = 65_536;
/// Slots a socket may take in [`MAP_SOCK_SLOTS`] before it goes to [`MAP_SOCKS`]: its
/// sequential slot, then four spread by a hash (see [`sock_slot`]).
pub const SOCK_SLOT_PROBES: u32 = 5;
/// [`SockSlot::cookie`] of a free slot.
pub const SLOT_FREE: u64 = 0;
/// [`SockSlot::cookie`] of a slot being written (no socket has this cookie).
pub const SLOT_BUSY: u64 = u64::MAX;

/// Index of probe `probe` (0..[`SOCK_SLOT_PROBES`]) for `cookie` in a slot table of
/// `mask + 1` slots.
///
/// Probe 0 is the cookie itself, masked. The kernel hands out cookies in sequence (per CPU, in
/// batches), so sockets opened one after another take neighbouring slots: a connection storm
/// walks the table in order, touching the cache lines its previous socket brought in or the
/// prefetcher fetched, where a hashed slot is a cache miss each time. Probes 1 to 4 spread by
/// Fibonacci hashing, so a run of slots held by long-lived sockets costs later sockets that
/// land in it one more probe, not their record. They are the probes 0 to 3 of agents before
/// the sequential probe, so records those placed in a pinned table are still found.
#[inline(always)]
pub const fn sock_slot(cookie: u64, probe: u32, mask: u32) -> u32 {
    if probe == 0 {
        return cookie as u32 & mask;
    }
    let hash = cookie
        .wrapping_add(probe as u64 - 1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (hash >> 32) as u32 & mask
}

/// Slots of [`MAP_SOCK_SLOTS`] for a `max_tracked_sockets` of `max`: a power of two, so
/// [`sock_slot`] can mask.
pub const fn sock_slots_for(max: u32) -> u32 {
    let max = if max < MAX_SOCK_SLOTS {
        max
    } else {
        MAX_SOCK_SLOTS
    };
    if max == 0 {
        1
    } else {
        1 << (31 - max.leading_zeros())
    }
}
/// How many cgroup levels the program walks up looking for a policy.
pub const MAX_CGROUP_DEPTH: u32 = 32;
/// Key of the `[default]` policy in the policy table. No cgroup has id 0.
pub const DEFAULT_POLICY_KEY: u64 = 0;
/// Key of the table's generation in the policy table: a value no other table of this boot
/// has (the agent uses CLOCK_BOOTTIME nanoseconds at creation), split over
/// [`Policy::idle`] (low half) and [`Policy::interval`] (high half); no cgroup has this id.
/// Tables are never modified while installed, so a resolution the program cached under a
/// table's generation stays right for as long as that table is installed
/// ([`MAP_RESOLVED`]). Tables without it (from agents before the cache) are walked every
/// time.
pub const POLICY_GENERATION_KEY: u64 = u64::MAX;
/// Slots per CPU of [`MAP_RESOLVED`], a power of two: cgroups making connections on one CPU
/// at a time (a Kubernetes node runs up to 110 pods by default). The map takes 14 KiB per
/// possible CPU, 3.5 MiB on a 256-CPU host.
pub const RESOLVED_SLOTS: u32 = 256;

/// The [`Policy`] value stored under [`POLICY_GENERATION_KEY`].
pub const fn generation_entry(generation: u64) -> Policy {
    Policy {
        idle: generation as u32,
        interval: (generation >> 32) as u32,
        count: 0,
        user_timeout_ms: 0,
        mode: 0,
        flags: 0,
    }
}

/// The generation stored in a [`generation_entry`].
pub const fn entry_generation(entry: &Policy) -> u64 {
    entry.idle as u64 | (entry.interval as u64) << 32
}

/// Index in [`MAP_RESOLVED`] of cgroup `id`.
#[inline(always)]
pub const fn resolved_slot(id: u64) -> u32 {
    (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32 & (RESOLVED_SLOTS - 1)
}

// ---------------------------------------------------------------------------------------------
// Pin layout under the state directory (default `/sys/fs/bpf/keepalive`).
// ---------------------------------------------------------------------------------------------

/// Default state directory on bpffs.
pub const DEFAULT_STATE_DIR: &str = "/sys/fs/bpf/keepalive";
/// Link of the sock_ops program to the attach cgroup.
pub const PIN_LINK_SOCKOPS: &str = "link_sockops";
/// Link of the lock program to the attach cgroup (present only while a policy uses `lock`).
pub const PIN_LINK_LOCK: &str = "link_lock";
/// Iterator link for `status` over [`MAP_SOCKS`]; reading it yields [`StatusRecord`]s.
pub const PIN_LINK_STATUS: &str = "link_status";
/// Iterator link for `status` over [`MAP_SOCK_SLOTS`]; reading it yields [`StatusRecord`]s.
pub const PIN_LINK_STATUS_SLOTS: &str = "link_status_slots";

// ---------------------------------------------------------------------------------------------
// Policy.
// ---------------------------------------------------------------------------------------------

/// What a policy does to the sockets it covers.
pub mod mode {
    /// Replace whatever the application set before the connection was established.
    pub const ENFORCE: u32 = 1;
    /// Keep the application's values if it enabled SO_KEEPALIVE itself.
    pub const FILL: u32 = 2;
    /// Leave sockets alone.
    pub const OFF: u32 = 3;
    /// Like enforce, and the application cannot later switch keepalive off or loosen it.
    pub const LOCK: u32 = 4;
}

/// [`Policy::flags`] bits.
pub mod policy_flags {
    /// `user_timeout_ms` is set; otherwise the kernel's TCP_USER_TIMEOUT is left alone.
    pub const USER_TIMEOUT: u32 = 1;
    /// This entry is the `[default]` policy. The agent stores it under the attach cgroup's id
    /// too (unless that cgroup has a policy of its own), so the ancestor walk ends with a hit
    /// instead of a second lookup.
    pub const DEFAULT: u32 = 2;
    /// Set by the agent, on `off` entries only and in one table only, for a cgroup that
    /// appeared since the table before it. Until the agent has seen a new cgroup, its sockets
    /// get an ancestor's policy; the apply pass after this table releases those the program
    /// enforced, as if the cgroup had been `off` from the start (see
    /// [`apply_result::RELEASED`]).
    pub const NEW_CGROUP: u32 = 4;
    /// Only in [`MAP_LISTENERS`]: SO_KEEPALIVE was on, the application's own, when the program
    /// first configured the listener; `off` leaves it on.
    pub const APP_KEEPALIVE: u32 = 8;
    /// Only in [`MAP_LISTENERS`] and [`MAP_LISTEN_PORTS`]: a call the program made to set this
    /// policy on the listener failed. The next apply pass sets it again, and `fill` does not
    /// take keepalive being off there for the application's choice.
    pub const SET_FAILED: u32 = 16;
    /// Only in [`MAP_LISTENERS`], with [`APP_KEEPALIVE`]: `fill` left the listener's keepalive
    /// to the application, which had switched it on before the program configured it; the
    /// program set nothing there, and keeps what the application does with it (switch it off,
    /// say). The other fields mean nothing.
    pub const APP_OWNED: u32 = 32;
}

/// Key of [`MAP_LISTEN_PORTS`]: a listener's cgroup id, local port (host byte order) and
/// network namespace, so that listeners on one port in one cgroup but in different namespaces
/// (each with its own port space) do not share an entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ListenPort {
    /// The listener's cgroup id.
    pub cgroup_id: u64,
    /// Its local port.
    pub port: u32,
    /// Its network namespace's inode number ([`KernelOffsets::net_inum`]); 0 in entries from
    /// older builds, which lookups no longer find.
    pub netns: u32,
}
const _: () = assert!(core::mem::size_of::<ListenPort>() == 16);

/// One keepalive policy as the program applies it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Policy {
    /// TCP_KEEPIDLE in seconds.
    pub idle: u32,
    /// TCP_KEEPINTVL in seconds.
    pub interval: u32,
    /// TCP_KEEPCNT.
    pub count: u32,
    /// TCP_USER_TIMEOUT in milliseconds, valid when [`policy_flags::USER_TIMEOUT`] is set.
    pub user_timeout_ms: u32,
    /// One of [`mode`].
    pub mode: u32,
    /// [`policy_flags`] bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<Policy>() == 24);

impl Policy {
    /// The longest TCP_USER_TIMEOUT, in milliseconds, that leaves this policy's keepalive as
    /// strict as it is: while a user timeout is set, the kernel drops an idle connection at the
    /// first unanswered probe after it has passed, whatever `count` says, so a longer one than
    /// `idle + interval × count` lets a dead peer stay longer. At most what TCP_USER_TIMEOUT
    /// takes (`i32::MAX`).
    pub const fn keepalive_span_ms(&self) -> u32 {
        let ms = (self.idle as u64 + self.interval as u64 * self.count as u64) * 1000;
        if ms > i32::MAX as u64 {
            i32::MAX as u32
        } else {
            ms as u32
        }
    }

    /// Whether a socket with user timeout `ms` (0: none) holds to this policy's user timeout:
    /// the policy's own if it has one; under `lock` without one, none or one that does not
    /// loosen keepalive (see [`Policy::keepalive_span_ms`]); otherwise any.
    pub const fn user_timeout_held(&self, ms: u32) -> bool {
        if self.flags & policy_flags::USER_TIMEOUT != 0 {
            ms == self.user_timeout_ms
        } else {
            self.mode != mode::LOCK || ms <= self.keepalive_span_ms()
        }
    }
}

/// One slot of [`MAP_RESOLVED`]: the policy found for cgroup `cgroup` in the policy table of
/// generation `generation`.
///
/// Each CPU has its own slots, so only programs on the same CPU (a softirq interrupting one in
/// process context, or a preempted one) can meet in a slot; `seq` is odd while a writer fills
/// it, and a reader takes the copy only if `seq` was even and the same before and after.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ResolvedSlot {
    /// Write sequence: odd while being written.
    pub seq: u64,
    /// The socket's cgroup id; 0 in an unused slot.
    pub cgroup: u64,
    /// [`POLICY_GENERATION_KEY`] of the table the walk was made in.
    pub generation: u64,
    /// The cgroup whose policy matched, or [`DEFAULT_POLICY_KEY`].
    pub policy_cgroup: u64,
    /// The policy found.
    pub policy: Policy,
}
const _: () = assert!(core::mem::size_of::<ResolvedSlot>() == 56);

/// Slots of the connect cache ([`MAP_CONNECTS`]).
pub const CONNECT_SLOTS: u32 = 4096;

/// Cookies the kernel hands each CPU at a time (`COOKIE_LOCAL_BATCH`): a CPU takes cookies
/// one after another from a run of this many, `n * COOKIE_BATCH + 1` to
/// `(n + 1) * COOKIE_BATCH`.
pub const COOKIE_BATCH: u64 = 4096;

/// The [`MAP_CONNECTS`] slot of `cookie`. Consecutive cookies take consecutive slots, so a
/// connect finds the cache line the previous one on its CPU brought in. Each batch of cookies
/// ([`COOKIE_BATCH`]) starts at an offset of its own: by position in the batch alone, connects
/// on CPUs at the same position would take the same slot, and one would lose its process.
#[inline(always)]
pub const fn connect_slot(cookie: u64) -> u32 {
    let batch = cookie.wrapping_sub(1) / COOKIE_BATCH;
    let offset = batch.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
    (cookie.wrapping_add(offset) % CONNECT_SLOTS as u64) as u32
}

/// Who called connect(), kept from TCP_CONNECT_CB (process context) until the connection is
/// established (often in softirq, where the current task is unrelated). A direct-mapped cache
/// indexed by cookie: a slot reused before establishment just means "unknown", never a wrong
/// process, because the cookie is checked.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnectSlot {
    /// Cookie of the connecting socket; 0 in a slot never used, [`SLOT_BUSY`] while one
    /// connect writes it.
    pub cookie: u64,
    /// Thread group id of the caller.
    pub pid: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// Command name of the caller.
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<ConnectSlot>() == 32);
// The program copies names and addresses a word at a time.
const _: () = assert!(
    core::mem::offset_of!(ConnectSlot, comm) % 8 == 0
        && core::mem::offset_of!(SockRecord, comm) % 8 == 0
        && core::mem::offset_of!(SockRecord, local_addr) % 8 == 0
        && core::mem::offset_of!(SockRecord, remote_addr) % 8 == 0
);

/// Read-only settings handed to the program at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Settings {
    /// cgroup id of the attach cgroup. The ancestor walk stops here, and iterators skip sockets
    /// outside it.
    pub attach_cgroup_id: u64,
    /// Slots in [`MAP_SOCK_SLOTS`] minus one (the slot count is a power of two).
    pub sock_slot_mask: u32,
    /// Explicit padding.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 16);

/// Byte offsets of the kernel fields the program reads, taken from `/sys/kernel/btf/vmlinux` by
/// the agent. Rust has no CO-RE field relocations, so this is how the program stays correct
/// across kernel builds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct sock`: `sk_cgrp_data.cgroup` (a `struct cgroup *`).
    pub sock_cgroup: u32,
    /// `struct sock`: `sk_err` (an `int`).
    pub sock_err: u32,
    /// `struct cgroup`: `kn` (a `struct kernfs_node *`).
    pub cgroup_kn: u32,
    /// `struct kernfs_node`: `id` (a `u64`).
    pub kn_id: u32,
    /// `struct kernfs_node`: `parent` (renamed `__parent` in 6.15).
    pub kn_parent: u32,
    /// `struct sock_common`: `skc_daddr`.
    pub skc_daddr: u32,
    /// `struct sock_common`: `skc_rcv_saddr`.
    pub skc_rcv_saddr: u32,
    /// `struct sock_common`: `skc_dport` (network order).
    pub skc_dport: u32,
    /// `struct sock_common`: `skc_num` (host order).
    pub skc_num: u32,
    /// `struct sock_common`: `skc_family`.
    pub skc_family: u32,
    /// `struct sock_common`: `skc_state`.
    pub skc_state: u32,
    /// `struct sock_common`: `skc_v6_daddr`.
    pub skc_v6_daddr: u32,
    /// `struct sock_common`: `skc_v6_rcv_saddr`.
    pub skc_v6_rcv_saddr: u32,
    /// `struct sock_common`: `skc_cookie` (the socket cookie, an `atomic64_t`).
    pub skc_cookie: u32,
    /// `sk_flags` (an `unsigned long`; in `struct sock_common` since 6.x, before in `struct sock`).
    pub sk_flags: u32,
    /// Bit of `SOCK_KEEPOPEN` in `sk_flags` (from `enum sock_flags`).
    pub sock_keepopen_bit: u32,
    /// `struct tcp_sock`: `keepalive_time` (jiffies).
    pub tcp_keepalive_time: u32,
    /// `struct tcp_sock`: `keepalive_intvl` (jiffies).
    pub tcp_keepalive_intvl: u32,
    /// `struct tcp_sock`: `keepalive_probes` (a `u8`).
    pub tcp_keepalive_probes: u32,
    /// `struct inet_connection_sock`: `icsk_user_timeout` (milliseconds).
    pub icsk_user_timeout: u32,
    /// `struct inet_connection_sock`: `icsk_probes_out` (a `u8`).
    pub icsk_probes_out: u32,
    /// `struct sock`: `sk_err_soft` (an `int`).
    pub sock_err_soft: u32,
    /// `struct sock_common`: `skc_net.net` (a `struct net *`); 0 on a kernel without network
    /// namespaces, whose sockets then all count as in namespace 0.
    pub skc_net: u32,
    /// `struct net`: `ns.inum` (the namespace's inode number); 0 when unknown, as above.
    pub net_inum: u32,
}
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 96);

// ---------------------------------------------------------------------------------------------
// Tracking records.
// ---------------------------------------------------------------------------------------------

/// [`SockRecord::flags`] bits.
pub mod sock_flags {
    /// The socket connected out (ACTIVE_ESTABLISHED); otherwise it was accepted.
    pub const OUTBOUND: u32 = 1 << 0;
    /// The socket was accepted (PASSIVE_ESTABLISHED).
    pub const INBOUND: u32 = 1 << 1;
    /// The program set the policy values on this socket.
    pub const ENFORCED: u32 = 1 << 2;
    /// `fill` mode found keepalive enabled by the application; its values were kept.
    pub const APP_OWNED: u32 = 1 << 3;
    /// The kernel calls the program when the socket changes state (close accounting, dead-peer
    /// detection and removal of this record depend on it).
    pub const STATE_CB: u32 = 1 << 4;
    /// Later setsockopt calls by the application are held at the policy (`lock` mode).
    pub const LOCKED: u32 = 1 << 5;
    /// The socket existed before enforcement and got its policy from the apply iterator.
    pub const RETROACTIVE: u32 = 1 << 6;
    /// At least one bpf_setsockopt call failed on this socket.
    pub const SETSOCKOPT_FAILED: u32 = 1 << 7;
    /// The socket's `pid` and `comm` were recorded in process context at connect().
    pub const HAS_TASK: u32 = 1 << 8;
    /// An accepted socket that already carried the policy, inherited from its listener, so no
    /// setsockopt call was needed.
    pub const INHERITED: u32 = 1 << 9;
    /// SO_KEEPALIVE was already on when the program first saw the socket: the application's
    /// own, or, on an accepted socket, inherited from its listener, whose owner cannot be told
    /// from here unless [`MAP_LISTEN_PORTS`] was looked up (see there), which says. Releasing
    /// the socket leaves keepalive on.
    pub const APP_KEEPALIVE: u32 = 1 << 10;
    /// With [`APP_OWNED`]: the record's user timeout is one the program set before `fill`
    /// left the socket's keepalive to the application, still the program's to change or drop
    /// with the policy.
    pub const OWN_USER_TIMEOUT: u32 = 1 << 11;
    /// With [`STATE_CB`]: the socket's state-change callbacks were on before the program asked
    /// for them, so a release leaves them on. Usually another program's (one attached below
    /// keepalive's, which runs first, or on the listener the socket was accepted from), but
    /// the kernel keeps the switch until something clears it, so it can also be the program's
    /// own: from an earlier connection of the same socket, from before a `detach` and a new
    /// start, or on a listener that connected under keepalive before it listened. Then the
    /// callbacks stay after a release, and find no record.
    pub const STATE_CB_HELD: u32 = 1 << 12;
}

/// Per-socket tracking record, kept in [`MAP_SOCK_SLOTS`] or [`MAP_SOCKS`] for each enforced
/// socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockRecord {
    /// The socket's own cgroup.
    pub cgroup_id: u64,
    /// The cgroup whose policy applied ([`DEFAULT_POLICY_KEY`] for `[default]`).
    pub policy_cgroup_id: u64,
    /// CLOCK_MONOTONIC nanoseconds when the policy in force was applied, to a timer tick on new
    /// connections (CLOCK_BOOTTIME
    /// from earlier builds; the two differ only by the time the host spent suspended).
    pub applied_ns: u64,
    /// CLOCK_MONOTONIC nanoseconds (to a timer tick) when the connection was established; 0 when it existed
    /// before enforcement (unknown).
    pub established_ns: u64,
    /// Kernel address of the socket, used only to read live TCP state with
    /// `bpf_probe_read_kernel` after checking that the socket there still has this cookie.
    pub sk: u64,
    /// Thread group id of the process that called connect(), 0 when unknown.
    pub pid: u32,
    /// [`sock_flags`] bits.
    pub flags: u32,
    /// The values in force on the socket.
    pub policy: Policy,
    /// Command name of the process that called connect(), NUL padded.
    pub comm: [u8; 16],
    /// Local address: IPv4 in the first 4 bytes for `AF_INET`, else IPv6 (network order).
    pub local_addr: [u8; 16],
    /// Remote address, same layout.
    pub remote_addr: [u8; 16],
    /// Local port, host order.
    pub local_port: u16,
    /// Remote port, host order.
    pub remote_port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// TCP state as of the last state change the program saw.
    pub state: u8,
    /// Explicit padding.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<SockRecord>() == 128);

/// One entry of [`MAP_SOCK_SLOTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockSlot {
    /// The socket's cookie; [`SLOT_FREE`] or [`SLOT_BUSY`] when the slot holds no record.
    pub cookie: u64,
    /// The tracking record.
    pub sock: SockRecord,
}
const _: () = assert!(core::mem::size_of::<SockSlot>() == 136);

/// One enforced socket as the status iterator reports it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StatusRecord {
    /// The socket cookie.
    pub cookie: u64,
    /// The tracking record.
    pub sock: SockRecord,
    /// Live TCP state read from the socket (0 when it could not be read).
    pub live_state: u8,
    /// Keepalive (or zero-window) probes sent without an answer.
    pub probes_out: u8,
    /// Explicit padding.
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<StatusRecord>() == 144);

/// Counters kept per socket cgroup. The number of open enforced sockets is not kept here: it
/// is counted from the tracking records when read, which costs nothing per connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// Sockets enforced since the maps were created.
    pub enforced_total: u64,
    /// Enforced sockets the kernel closed with ETIMEDOUT: keepalive or the user timeout expired.
    pub dead_peers: u64,
}
const _: () = assert!(core::mem::size_of::<CgroupStats>() == 16);

/// Outcome of the apply iterator for one socket, written as one byte per visited socket.
pub mod apply_result {
    /// Policy values were set.
    pub const APPLIED: u8 = 1;
    /// The socket already carried exactly this policy.
    pub const UNCHANGED: u8 = 2;
    /// `off` policy: left alone.
    pub const SKIPPED_OFF: u8 = 3;
    /// `fill` policy and the application enabled keepalive itself: left alone.
    pub const KEPT_APP: u8 = 4;
    /// A bpf_setsockopt call failed.
    pub const FAILED: u8 = 5;
    /// `off` policy of a new cgroup ([`policy_flags::NEW_CGROUP`]) on a socket the program had
    /// enforced under an ancestor's policy before the cgroup had its own: SO_KEEPALIVE switched
    /// off again unless the application had it on ([`sock_flags::APP_KEEPALIVE`]), a user
    /// timeout the program set back to the kernel's default, and the record dropped.
    pub const RELEASED: u8 = 6;
}

/// Indexes into [`MAP_COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Sockets that got policy values at establish time.
    Enforced = 0,
    /// `fill` sockets that kept the application's own keepalive.
    KeptApp,
    /// Sockets in `off` cgroups.
    SkippedOff,
    /// bpf_setsockopt(SO_KEEPALIVE) failed.
    FailKeepalive,
    /// bpf_setsockopt(TCP_KEEPIDLE) failed.
    FailIdle,
    /// bpf_setsockopt(TCP_KEEPINTVL) failed.
    FailInterval,
    /// bpf_setsockopt(TCP_KEEPCNT) failed.
    FailCount,
    /// bpf_setsockopt(TCP_USER_TIMEOUT) failed.
    FailUserTimeout,
    /// The socket's cgroup could not be read; the default policy applied.
    CgroupUnknown,
    /// The socket was enforced but is not listed: the tracking map was full, or (before Linux
    /// 6.12) a connection that existed before the agent could not get the close callback its
    /// record needs. Counted once per socket; its record goes to [`MAP_UNTRACKED`].
    TrackingFull,
    /// The per-cgroup counter map was full; enforcement still happened.
    CgroupStatsFull,
    /// Application setsockopt calls held at a `lock` policy.
    LockClamped,
    /// Dead peers detected (all cgroups, including ones the stats map had no room for).
    DeadPeers,
    /// The policy table was missing (agent never pushed one); nothing was applied.
    NoPolicyTable,
    /// Accepted sockets that inherited the policy from their listener (no setsockopt needed).
    Inherited,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 15] = [
        Counter::Enforced,
        Counter::KeptApp,
        Counter::SkippedOff,
        Counter::FailKeepalive,
        Counter::FailIdle,
        Counter::FailInterval,
        Counter::FailCount,
        Counter::FailUserTimeout,
        Counter::CgroupUnknown,
        Counter::TrackingFull,
        Counter::CgroupStatsFull,
        Counter::LockClamped,
        Counter::DeadPeers,
        Counter::NoPolicyTable,
        Counter::Inherited,
    ];
    /// Number of counters, the size of [`MAP_COUNTERS`].
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// Stable snake_case name used in metrics and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Enforced => "enforced",
            Counter::KeptApp => "kept_app_keepalive",
            Counter::SkippedOff => "skipped_off",
            Counter::FailKeepalive => "setsockopt_failed_so_keepalive",
            Counter::FailIdle => "setsockopt_failed_tcp_keepidle",
            Counter::FailInterval => "setsockopt_failed_tcp_keepintvl",
            Counter::FailCount => "setsockopt_failed_tcp_keepcnt",
            Counter::FailUserTimeout => "setsockopt_failed_tcp_user_timeout",
            Counter::CgroupUnknown => "cgroup_unknown",
            Counter::TrackingFull => "socket_tracking_full",
            Counter::CgroupStatsFull => "cgroup_stats_full",
            Counter::LockClamped => "lock_clamped",
            Counter::DeadPeers => "dead_peers",
            Counter::NoPolicyTable => "no_policy_table",
            Counter::Inherited => "inherited_from_listener",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Kernel constants (uapi), spelled out once for both sides.
// ---------------------------------------------------------------------------------------------

/// Kernel ABI numbers used by both sides.
pub mod uapi {
    pub const AF_INET: u16 = 2;
    pub const AF_INET6: u16 = 10;
    pub const SOL_SOCKET: i32 = 1;
    pub const SO_KEEPALIVE: i32 = 9;
    pub const IPPROTO_TCP: i32 = 6;
    pub const TCP_KEEPIDLE: i32 = 4;
    pub const TCP_KEEPINTVL: i32 = 5;
    pub const TCP_KEEPCNT: i32 = 6;
    pub const TCP_USER_TIMEOUT: i32 = 18;
    /// `bpf_setsockopt` pseudo-option to set a socket's sock_ops callback flags (kernel 6.12+).
    pub const TCP_BPF_SOCK_OPS_CB_FLAGS: i32 = 1008;
    pub const ETIMEDOUT: i32 = 110;
    pub const TCP_ESTABLISHED: u8 = 1;
    pub const TCP_CLOSE: u8 = 7;
    pub const TCP_CLOSE_WAIT: u8 = 8;
    pub const TCP_LISTEN: u8 = 10;
    /// `BPF_SOCK_OPS_STATE_CB_FLAG`.
    pub const SOCK_OPS_STATE_CB_FLAG: u32 = 1 << 2;
    /// Kernel limit for TCP_KEEPIDLE and TCP_KEEPINTVL (`MAX_TCP_KEEPIDLE`, seconds).
    pub const MAX_KEEPIDLE: u32 = 32_767;
    /// Kernel limit for TCP_KEEPINTVL (`MAX_TCP_KEEPINTVL`, seconds).
    pub const MAX_KEEPINTVL: u32 = 32_767;
    /// Kernel limit for TCP_KEEPCNT (`MAX_TCP_KEEPCNT`).
    pub const MAX_KEEPCNT: u32 = 127;
    /// TCP_USER_TIMEOUT takes a non-negative `int` of milliseconds.
    pub const MAX_USER_TIMEOUT_MS: u32 = i32::MAX as u32;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, and free of padding (see the size
    // assertions above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::Policy {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::SockRecord {}
    unsafe impl aya::Pod for super::SockSlot {}
    unsafe impl aya::Pod for super::StatusRecord {}
    unsafe impl aya::Pod for super::CgroupStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_user_timeout_is_bounded_by_keepalives_span_and_fits_an_int() {
        let policy = Policy {
            idle: 21,
            interval: 7,
            count: 4,
            mode: mode::LOCK,
            ..Policy::default()
        };
        assert_eq!(policy.keepalive_span_ms(), 49_000);
        assert!(policy.user_timeout_held(0) && policy.user_timeout_held(49_000));
        assert!(!policy.user_timeout_held(49_001));
        let enforce = Policy {
            mode: mode::ENFORCE,
            ..policy
        };
        assert!(enforce.user_timeout_held(600_000), "only `lock` bounds it");
        let own = Policy {
            user_timeout_ms: 5_000,
            flags: policy_flags::USER_TIMEOUT,
            ..enforce
        };
        assert!(own.user_timeout_held(5_000) && !own.user_timeout_held(0));
        let longest = Policy {
            idle: 32767,
            interval: 32767,
            count: 127,
            ..policy
        };
        assert_eq!(longest.keepalive_span_ms(), i32::MAX as u32);
    }

    #[test]
    fn status_chunks_cover_every_slot() {
        assert_eq!(slot_chunks_for(1), 1);
        assert_eq!(slot_chunks_for(64), 1);
        assert_eq!(slot_chunks_for(128), 2);
        assert_eq!(
            slot_chunks_for(MAX_SOCK_SLOTS),
            MAX_SOCK_SLOTS / STATUS_CHUNK
        );
        assert!(STATUS_CHUNK as usize * size_of::<StatusRecord>() <= 32 * 1024);
    }

    #[test]
    fn slot_tables_are_powers_of_two_within_bounds() {
        assert_eq!(sock_slots_for(1), 1);
        assert_eq!(sock_slots_for(3), 2);
        assert_eq!(sock_slots_for(4), 4);
        assert_eq!(sock_slots_for(1000), 512);
        assert_eq!(sock_slots_for(DEFAULT_MAX_TRACKED_SOCKETS), MAX_SOCK_SLOTS);
        assert_eq!(sock_slots_for(u32::MAX), MAX_SOCK_SLOTS);
    }

    #[test]
    fn connect_slots_follow_cookies_and_differ_between_batches() {
        let first = 7 * COOKIE_BATCH + 1;
        for cookie in first..first + COOKIE_BATCH - 1 {
            assert_eq!(
                connect_slot(cookie + 1),
                (connect_slot(cookie) + 1) % CONNECT_SLOTS,
                "cookie {cookie}"
            );
        }
        // The same position in 64 batches (64 CPUs, say): nearly always 64 slots.
        let slots: std::collections::HashSet<u32> = (0..64u64)
            .map(|batch| connect_slot(batch * COOKIE_BATCH + 5))
            .collect();
        assert!(slots.len() >= 62, "{} distinct slots", slots.len());
        assert!((0..10_000u64).all(|cookie| connect_slot(cookie) < CONNECT_SLOTS));
    }

    #[test]
    fn consecutive_cookies_take_consecutive_slots_then_spread() {
        let mask = MAX_SOCK_SLOTS - 1;
        // Probe 0: the kernel's consecutive cookies take consecutive slots, wrapping.
        assert_eq!(sock_slot(1_000_000, 0, mask), 1_000_000 & mask);
        assert_eq!(sock_slot(1_000_001, 0, mask), (1_000_000 & mask) + 1);
        assert_eq!(sock_slot(u64::from(mask) + 1, 0, mask), 0);
        // The hashed probes spread a run of 4096 cookies (a per-CPU batch) over distinct
        // slots nearly always, so sockets whose sequential slots are all held by one run of
        // long-lived sockets do not collide again among themselves.
        for probe in 1..SOCK_SLOT_PROBES {
            let used: std::collections::HashSet<u32> = (1_000_000..1_004_096u64)
                .map(|cookie| sock_slot(cookie, probe, mask))
                .collect();
            assert!(
                used.len() > 3900,
                "probe {probe}: {} distinct slots",
                used.len()
            );
        }
        // The hashed probes are where agents before the sequential probe put records.
        let fibonacci = |cookie: u64| ((cookie.wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 32) as u32;
        for probe in 1..SOCK_SLOT_PROBES {
            assert_eq!(
                sock_slot(12345, probe, mask),
                fibonacci(12345 + u64::from(probe) - 1) & mask
            );
        }
        // A socket's probes are distinct slots.
        let probes: std::collections::HashSet<u32> = (0..SOCK_SLOT_PROBES)
            .map(|p| sock_slot(12345, p, mask))
            .collect();
        assert_eq!(probes.len(), SOCK_SLOT_PROBES as usize);
        assert!((0..100u64).all(|c| (0..SOCK_SLOT_PROBES).all(|p| sock_slot(c, p, 7) <= 7)));
    }
}
