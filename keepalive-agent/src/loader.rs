//! Loading the embedded BPF object, attaching it, and pushing policy tables.
//!
//! Every start loads the embedded programs afresh, reusing the pinned maps (so counters and
//! socket records survive), and then either attaches them or, when a pinned link exists,
//! swaps the new program into that link with `BPF_LINK_UPDATE`. Either way there is exactly one
//! attachment and no moment without enforcement.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{ArrayOfMaps, HashMap, MapData, MapError},
    programs::{CgroupSockopt, Iter, ProgramError, SockOps},
};
use keepalive_common::{
    AGENT_SEEN_CGROUPS, CgroupStats, DEFAULT_MAX_TRACKED_CGROUPS, DEFAULT_MAX_TRACKED_SOCKETS,
    GLOBAL_OFFSETS, GLOBAL_SETTINGS, KernelOffsets, MAP_AGENT, MAP_APPLY, MAP_CGSTATS, MAP_POLICY,
    MAP_SLOT_CHUNKS, MAP_SOCK_SLOTS, MAP_SOCKS, MAX_POLICIES, PINNED_MAPS, POLICY_GENERATION_KEY,
    PROG_APPLY, PROG_LOCK, PROG_SOCKOPS, PROG_STATUS, PROG_STATUS_SLOTS, Policy, Settings,
    generation_entry, slot_chunks_for, sock_slots_for,
};

use crate::{
    apply::{self, ApplyReport},
    btf::Btf,
    cgroup::{Cgroup2, CgroupPath},
    error::Error,
    pin::{self, StateDir},
    sys,
};

/// `BPF_F_NO_PREALLOC`: policy tables only use memory for the entries they hold.
const BPF_F_NO_PREALLOC: u32 = 1;

/// The BPF object built by `build.rs`; empty when built without bpf-linker.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/keepalive"));

/// What the loader needs to know.
#[derive(Debug)]
pub struct LoadOptions<'a> {
    /// Where pins live.
    pub state: &'a StateDir,
    /// The attach cgroup's directory, opened when its id was read.
    pub attach_dir: &'a File,
    /// Its id.
    pub attach_id: u64,
    /// Size of the per-cgroup counter map when it is created.
    pub max_tracked_cgroups: Option<u32>,
    /// Size of the socket tracking maps when they are created.
    pub max_tracked_sockets: Option<u32>,
    /// aya-log level for the BPF programs (0 compiles the log statements out).
    pub bpf_log_level: u8,
}

/// The loaded programs and maps of one agent.
pub struct Enforcer {
    ebpf: Ebpf,
    state: StateDir,
    cgroup: File,
    attach_id: u64,
    apply_link: Option<OwnedFd>,
    /// The sock_ops and setsockopt links this agent attached or took over, held so that a pin
    /// removed while it runs (by hand, say) ends no enforcement and can be made again
    /// ([`Enforcer::restore_pins`]).
    links: [Option<OwnedFd>; 2],
    /// The installed policy table and the one it replaced, held open (see
    /// [`Enforcer::push_table`]).
    tables: [Option<PolicyTable>; 2],
}

type PolicyTable = HashMap<MapData, u64, Policy>;

impl std::fmt::Debug for Enforcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enforcer")
            .field("state", &self.state)
            .field("attach_id", &self.attach_id)
            .finish_non_exhaustive()
    }
}

/// Whether the embedded object is real (built with bpf-linker) rather than the stub.
pub fn object_available() -> bool {
    !EBPF_OBJECT.is_empty()
}

/// Fails when the embedded object is the stub, saying how to get the real one.
pub fn require_object() -> anyhow::Result<()> {
    if object_available() {
        return Ok(());
    }
    Err(anyhow!(
        "this keepalive-agent was built without its BPF program (bpf-linker was missing at \
         build time); run `cargo xtask setup` and rebuild"
    ))
}

/// What the pinned sock_ops link runs and where it is attached, if one is pinned.
pub fn pinned_sockops_link(state: &StateDir) -> anyhow::Result<Option<sys::LinkInfo>> {
    pinned_link(&state.sockops_link())
}

/// What the link pinned at `path` runs and where it is attached, if one is pinned there.
pub fn pinned_link(path: &Path) -> anyhow::Result<Option<sys::LinkInfo>> {
    match sys::obj_get(path) {
        Ok(fd) => sys::link_info(fd.as_fd())
            .map(Some)
            .with_context(|| format!("failed to read link info of {}", path.display())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("failed to open {}", path.display())),
    }
}

/// The cgroup a pinned link is attached to; `None` when it was removed, and the link enforces
/// nothing any more: the kernel detaches a cgroup's links when it releases the cgroup (the
/// link's cgroup id reads 0 then), and before that the removed cgroup is no longer in the tree.
/// An error when the tree could not be searched all through (see [`Cgroup2::locate`]).
pub fn link_cgroup(link: &sys::LinkInfo, cgroup2: &Cgroup2) -> io::Result<Option<CgroupPath>> {
    if link.cgroup_id == 0 {
        return Ok(None);
    }
    cgroup2.locate(link.cgroup_id)
}

/// Removes the pins of the links of a removed cgroup, which no longer cover new connections.
pub fn unpin_defunct_links(state: &StateDir) -> anyhow::Result<()> {
    for path in [state.sockops_link(), state.lock_link()] {
        pin::unpin(&path)?;
    }
    Ok(())
}

/// The cgroup id the pinned sock_ops link is attached to, if one is pinned.
pub fn pinned_attach_id(state: &StateDir) -> anyhow::Result<Option<u64>> {
    Ok(pinned_sockops_link(state)?.map(|info| info.cgroup_id))
}

/// A failure of the kernel to do `what`: that it cannot run the agent (exit 6, which the unit
/// does not retry), unless `transient` holds the errno the kernel gave, which a later start
/// may not meet (exit 1, retried).
fn kernel_error_but(
    what: &str,
    err: impl std::error::Error + Send + Sync + 'static,
    transient: &[i32],
) -> anyhow::Error {
    let err = anyhow::Error::new(err);
    // aya's errors keep the kernel's errno in their sources.
    let errno = err
        .chain()
        .find_map(|cause| cause.downcast_ref::<io::Error>()?.raw_os_error());
    if errno.is_some_and(|errno| transient.contains(&errno)) {
        return err.context(what.to_owned());
    }
    Error::Kernel(format!("{what}: {err:#}")).into()
}

/// [`kernel_error_but`] where only memory, which the kernel may have again (the agent's
/// cgroup at its memory limit during an upgrade, say), is transient.
fn kernel_error(what: &str, err: impl std::error::Error + Send + Sync + 'static) -> anyhow::Error {
    kernel_error_but(what, err, &[libc::ENOMEM])
}

/// The error of a failed load. A map the kernel has no memory for, at a size the capacity
/// settings decide, is theirs to fix (exit 2, not retried by the unit either); anything else
/// is the kernel's (exit 6).
fn load_error(err: EbpfError, opts: &LoadOptions<'_>) -> anyhow::Error {
    match no_memory(&err, opts.max_tracked_cgroups, opts.max_tracked_sockets) {
        Some(why) => Error::Usage(why).into(),
        None => kernel_error("failed to load the BPF object", err),
    }
}

/// What to say of a load that failed for want of memory for a map the capacity settings size.
fn no_memory(
    err: &EbpfError,
    max_tracked_cgroups: Option<u32>,
    max_tracked_sockets: Option<u32>,
) -> Option<String> {
    let EbpfError::MapError(MapError::CreateError { name, io_error }) = err else {
        return None;
    };
    if io_error.raw_os_error() != Some(libc::ENOMEM) {
        return None;
    }
    let (key, set, default) = if name == MAP_CGSTATS {
        (
            "max_tracked_cgroups",
            max_tracked_cgroups,
            DEFAULT_MAX_TRACKED_CGROUPS,
        )
    } else if [MAP_SOCKS, MAP_SOCK_SLOTS, MAP_SLOT_CHUNKS].contains(&name.as_str()) {
        (
            "max_tracked_sockets",
            max_tracked_sockets,
            DEFAULT_MAX_TRACKED_SOCKETS,
        )
    } else {
        return None;
    };
    let size = match set {
        Some(n) => n.to_string(),
        None => format!("{default} (the default)"),
    };
    Some(format!(
        "the kernel has no memory for map {name}, sized by {key} = {size}: {io_error}; lower \
         {key} in the config (or --{}), or raise the memory limit of the agent's cgroup",
        key.replace('_', "-")
    ))
}

impl Enforcer {
    /// Loads the programs, reusing (or creating and pinning) the maps in the state directory.
    /// Nothing is attached yet.
    pub fn load(opts: &LoadOptions<'_>, btf: &Btf) -> anyhow::Result<Self> {
        require_object()?;
        let offsets: KernelOffsets = btf.kernel_offsets().map_err(|err| {
            Error::Kernel(format!(
                "this kernel's layout is not supported: {err}; keepalive needs Linux 5.15 or \
                 newer with BTF"
            ))
        })?;
        let slots = sock_slots(opts.state, opts.max_tracked_sockets)?;
        let settings = Settings {
            attach_cgroup_id: opts.attach_id,
            sock_slot_mask: slots - 1,
            _pad: 0,
        };
        let pins: Vec<(&str, PathBuf)> = PINNED_MAPS
            .iter()
            .map(|name| (*name, opts.state.map(name)))
            .collect();
        check_pinned_layouts(&pins, opts.state)?;
        let mut loader = EbpfLoader::new();
        loader
            .override_global(GLOBAL_OFFSETS, &offsets, true)
            .override_global(GLOBAL_SETTINGS, &settings, true)
            .override_global(aya_log::LEVEL, &opts.bpf_log_level, false);
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        if let Some(max) = opts.max_tracked_cgroups {
            loader.map_max_entries(MAP_CGSTATS, max);
        }
        if let Some(max) = opts.max_tracked_sockets {
            loader.map_max_entries(MAP_SOCKS, max);
        }
        loader.map_max_entries(MAP_SOCK_SLOTS, slots);
        loader.map_max_entries(MAP_SLOT_CHUNKS, slot_chunks_for(slots));
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|err| load_error(err, opts))?;

        let sockops: &mut SockOps = program(&mut ebpf, PROG_SOCKOPS)?;
        sockops
            .load()
            .map_err(|err| kernel_error("the kernel rejected the sock_ops program", err))?;
        let lock: &mut CgroupSockopt = program(&mut ebpf, PROG_LOCK)?;
        lock.load()
            .map_err(|err| kernel_error("the kernel rejected the setsockopt program", err))?;
        let aya_btf = aya::Btf::from_sys_fs()
            .map_err(|err| kernel_error("failed to read kernel BTF", err))?;
        for name in [PROG_STATUS, PROG_STATUS_SLOTS] {
            let status: &mut Iter = program(&mut ebpf, name)?;
            status
                .load("bpf_map_elem", &aya_btf)
                .map_err(|err| kernel_error("the kernel rejected the status iterator", err))?;
        }
        // The TCP iterator needs bpf_setsockopt from iterators (Linux 5.15). Without it, new
        // connections are still enforced; existing ones are not touched. A kernel that has
        // what it needs and still rejects it found a fault in the program, which must not go
        // by as a warning.
        let apply_link = {
            let apply: &mut Iter = program(&mut ebpf, PROG_APPLY)?;
            match apply.load("tcp", &aya_btf) {
                Ok(()) => Some(
                    sys::iter_link_create(apply.fd()?.as_fd(), None)
                        .context("failed to create the TCP iterator link")?,
                ),
                Err(err) if lacks_iterator_support(&err) => {
                    log::warn!(
                        "this kernel cannot run the TCP iterator ({err:#}); policy applies to new \
                         connections only, not to connections that already exist"
                    );
                    None
                }
                Err(err) => return Err(kernel_error("the kernel rejected the TCP iterator", err)),
            }
        };
        let cgroup = opts
            .attach_dir
            .try_clone()
            .context("failed to duplicate the attach cgroup's descriptor")?;
        Ok(Self {
            ebpf,
            state: opts.state.clone(),
            cgroup,
            attach_id: opts.attach_id,
            apply_link,
            links: [None, None],
            tables: [None, None],
        })
    }

    /// Forwards log records of the BPF programs to the `log` crate.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).ok()
    }

    /// The entries of the policy table a previous agent left installed, before this agent
    /// pushed its own (`None` afterwards, and where none is installed). Opening it by id takes
    /// CAP_SYS_ADMIN.
    pub fn pinned_table(&mut self) -> anyhow::Result<Option<Vec<(u64, Policy)>>> {
        if self.tables[0].is_some() {
            return Ok(None);
        }
        let map = self
            .ebpf
            .map(MAP_POLICY)
            .ok_or_else(|| anyhow!("the BPF object has no {MAP_POLICY} map"))?;
        let outer: ArrayOfMaps<&MapData, PolicyTable> = map.try_into()?;
        let table = match outer.get(&0, 0) {
            Ok(table) => table,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(err) => return Err(err).context("failed to open the installed policy table"),
        };
        let entries = table
            .iter()
            .collect::<Result<_, _>>()
            .context("failed to read the installed policy table")?;
        Ok(Some(entries))
    }

    /// Replaces the active policy table with a new one in a single map update: a lookup sees
    /// the old table or the new one, never a mix. The kernel waits for programs still using
    /// the old table before the update returns.
    ///
    /// The table carries a generation no earlier table had, under which the program caches
    /// what it resolves (`POLICY_GENERATION_KEY`), so no cached resolution outlives its table.
    pub fn push_table(&mut self, table: &[(u64, Policy)]) -> anyhow::Result<()> {
        // Globs can resolve to more cgroups than there are rules; size the table to fit, with
        // the generation.
        let capacity = u32::try_from(table.len() + 1)
            .unwrap_or(u32::MAX)
            .max(MAX_POLICIES + 2);
        let mut inner: PolicyTable = HashMap::create(capacity, BPF_F_NO_PREALLOC)
            .context("failed to create a policy table")?;
        for (id, policy) in table {
            inner
                .insert(id, policy, 0)
                .context("failed to fill the policy table")?;
        }
        let generation = generation_entry(crate::status::boottime_now_ns());
        inner
            .insert(POLICY_GENERATION_KEY, generation, 0)
            .context("failed to fill the policy table")?;
        let map = self
            .ebpf
            .map_mut(MAP_POLICY)
            .ok_or_else(|| anyhow!("the BPF object has no {MAP_POLICY} map"))?;
        let mut outer: ArrayOfMaps<&mut MapData, PolicyTable> = map.try_into()?;
        // The table being replaced stays open until the next push: a program that looked it up
        // just before the swap may still read it, and kernels without the fix for
        // CVE-2023-52447 (6.8, and the stable releases it went to) free an inner map as soon
        // as its last reference goes, without waiting for such readers. Otherwise that would
        // be the swap's, the table's only other holder being the outer map. By the next push
        // every such read has long ended. The agent keeps the table it installs open for that;
        // one a previous agent left pinned it opens by id, which takes CAP_SYS_ADMIN.
        let [installed, _] = &mut self.tables;
        let replaced = match installed.take() {
            Some(table) => Some(table),
            None => match outer.get(&0, 0) {
                Ok(table) => Some(table),
                Err(MapError::KeyNotFound) => None,
                Err(err) => {
                    warn_unheld(&err);
                    None
                }
            },
        };
        if let Err(err) = outer.set(0, &inner, 0) {
            // Still installed: still held.
            self.tables[0] = replaced;
            return Err(err).context("failed to install the policy table");
        }
        self.tables = [Some(inner), replaced];
        Ok(())
    }

    /// Attaches the sock_ops program to the attach cgroup, or swaps it into the pinned link.
    /// Returns whether an existing attachment was updated.
    pub fn attach_sockops(&mut self) -> anyhow::Result<bool> {
        let path = self.state.sockops_link();
        let prog: &mut SockOps = program(&mut self.ebpf, PROG_SOCKOPS)?;
        let (link, updated) = attach_or_update(
            prog.fd()?.as_fd(),
            &self.cgroup,
            sys::ATTACH_CGROUP_SOCK_OPS,
            &path,
        )?;
        self.links[0] = Some(link);
        Ok(updated)
    }

    /// Attaches or removes the lock program to match whether any policy uses `lock`.
    pub fn set_lock(&mut self, wanted: bool) -> anyhow::Result<()> {
        let path = self.state.lock_link();
        if wanted {
            let prog: &mut CgroupSockopt = program(&mut self.ebpf, PROG_LOCK)?;
            let (link, _) = attach_or_update(
                prog.fd()?.as_fd(),
                &self.cgroup,
                sys::ATTACH_CGROUP_SETSOCKOPT,
                &path,
            )?;
            self.links[1] = Some(link);
        } else {
            // Let go first: the pin's removal must detach it.
            self.links[1] = None;
            if pin::unpin(&path)? {
                log::info!("no policy uses lock mode; removed the setsockopt program");
            }
        }
        Ok(())
    }

    /// Pins fresh status iterator links over the socket records, replacing any older ones.
    pub fn pin_status_iterator(&mut self) -> anyhow::Result<()> {
        // The slot table is read through its chunk map (one program run per chunk of slots),
        // which the link keeps alive; the hash is iterated itself.
        let chunks = self
            .ebpf
            .map(MAP_SLOT_CHUNKS)
            .ok_or_else(|| anyhow!("the BPF object has no {MAP_SLOT_CHUNKS} map"))?;
        let chunks = match chunks {
            aya::maps::Map::Array(data) => data.fd().as_fd().try_clone_to_owned()?,
            _ => return Err(anyhow!("{MAP_SLOT_CHUNKS} is not an array")),
        };
        let hash = sys::obj_get(&self.state.map(MAP_SOCKS))
            .with_context(|| format!("failed to open {MAP_SOCKS}"))?;
        let links = [
            (chunks, PROG_STATUS_SLOTS, self.state.status_slots_link()),
            (hash, PROG_STATUS, self.state.status_link()),
        ];
        for (map, prog, pin) in links {
            let prog: &mut Iter = program(&mut self.ebpf, prog)?;
            let link = sys::iter_link_create(prog.fd()?.as_fd(), Some(map.as_fd()))
                .context("failed to create the status iterator link")?;
            replace_pin(link.as_fd(), &pin)?;
        }
        Ok(())
    }

    /// Pins again whatever of this agent's state was removed from the state directory while it
    /// ran (`rm -rf` on it, say): its maps, the links it holds and the status iterators,
    /// making the directory again if need be and taking its lock again, before anything goes
    /// in. Without that, the links would go with the agent, and enforcement with them, with no
    /// `detach`. What was made or pinned again, by name; nothing when nothing was missing.
    pub fn restore_pins(&mut self, lock: &mut File) -> anyhow::Result<Vec<String>> {
        let mut restored = Vec::new();
        if self.state.create_root()? {
            restored.push("the directory".to_owned());
        }
        // Another agent (or a `detach`) may hold the directory now: nothing of it is touched.
        self.state.relock(lock)?;
        if !self.state.maps_dir().is_dir() {
            restored.push(pin_name(&self.state.maps_dir()));
        }
        self.state.create()?;
        for name in PINNED_MAPS {
            let path = self.state.map(name);
            if path.exists() {
                continue;
            }
            self.ebpf
                .map(name)
                .ok_or_else(|| anyhow!("the BPF object has no {name} map"))?
                .pin(&path)
                .with_context(|| format!("failed to pin {}", path.display()))?;
            restored.push(name.to_string());
        }
        let links = [self.state.sockops_link(), self.state.lock_link()];
        for (link, path) in self.links.iter().zip(links) {
            if let Some(link) = link.as_ref().filter(|_| !path.exists()) {
                sys::obj_pin(link.as_fd(), &path)
                    .with_context(|| format!("failed to pin {}", path.display()))?;
                restored.push(pin_name(&path));
            }
        }
        let iterators = [self.state.status_slots_link(), self.state.status_link()];
        let missing: Vec<String> = iterators
            .iter()
            .filter(|path| !path.exists())
            .map(|path| pin_name(path))
            .collect();
        if !missing.is_empty() {
            self.pin_status_iterator()?;
            restored.extend(missing);
        }
        Ok(restored)
    }

    /// The per-cgroup counter map.
    fn cgroup_stats(&mut self) -> Option<HashMap<&mut MapData, u64, CgroupStats>> {
        self.ebpf.map_mut(MAP_CGSTATS)?.try_into().ok()
    }

    /// Drops the per-cgroup counters of removed cgroups; how many there were.
    pub fn forget_cgroups(&mut self, ids: &[u64]) -> usize {
        if ids.is_empty() {
            return 0;
        }
        let Some(mut stats) = self.cgroup_stats() else {
            return 0;
        };
        // Absent when no socket of that cgroup was ever enforced.
        ids.iter().filter(|id| stats.remove(id).is_ok()).count()
    }

    /// Drops the per-cgroup counters of every cgroup that no longer exists: removed while no
    /// agent ran, or while the watcher could not follow it. The keys are read before the
    /// cgroups are listed, so a cgroup created meanwhile is never taken for a removed one. When
    /// the cgroups cannot all be listed (a directory root may not read hides those below it),
    /// none are dropped.
    pub fn forget_removed_cgroups(
        &mut self,
        cgroup2: &Cgroup2,
        attach: &CgroupPath,
    ) -> anyhow::Result<usize> {
        let keys: Vec<u64> = self
            .cgroup_stats()
            .map(|stats| stats.keys().filter_map(Result::ok).collect())
            .unwrap_or_default();
        let present = cgroup2.ids(attach)?;
        let removed: Vec<u64> = keys
            .into_iter()
            .filter(|id| !present.contains(id))
            .collect();
        Ok(self.forget_cgroups(&removed))
    }

    /// Applies the policy table to existing connections in one pass. `None` when the kernel
    /// cannot run the TCP iterator.
    pub fn apply_existing(&mut self, between: impl FnMut()) -> anyhow::Result<Option<ApplyReport>> {
        let Some(link) = &self.apply_link else {
            return Ok(None);
        };
        start_apply_pass(&mut self.ebpf)?;
        apply::apply_existing(link, between).map(Some)
    }

    /// The attach cgroup id.
    pub const fn attach_id(&self) -> u64 {
        self.attach_id
    }

    /// The highest cgroup id an agent over this state had seen, as [`Enforcer::set_seen_cgroups`]
    /// left it; 0 when none did (see `keepalive_common::MAP_AGENT`).
    pub fn seen_cgroups(&self) -> anyhow::Result<u64> {
        let map = self
            .ebpf
            .map(MAP_AGENT)
            .ok_or_else(|| anyhow!("the BPF object has no {MAP_AGENT} map"))?;
        let array: aya::maps::Array<&MapData, u64> = map.try_into()?;
        array
            .get(&AGENT_SEEN_CGROUPS, 0)
            .with_context(|| format!("failed to read {MAP_AGENT}"))
    }

    /// Keeps `id` as the highest cgroup id this agent has seen, for the next start.
    pub fn set_seen_cgroups(&mut self, id: u64) -> anyhow::Result<()> {
        let map = self
            .ebpf
            .map_mut(MAP_AGENT)
            .ok_or_else(|| anyhow!("the BPF object has no {MAP_AGENT} map"))?;
        let mut array: aya::maps::Array<&mut MapData, u64> = map.try_into()?;
        array
            .set(AGENT_SEEN_CGROUPS, id, 0)
            .with_context(|| format!("failed to write {MAP_AGENT}"))
    }
}

/// Slots in the slot table: those of the pinned one when it exists (its records are found by
/// the mask of its own size), else as many as `max_tracked_sockets` allows.
fn sock_slots(state: &StateDir, max_tracked_sockets: Option<u32>) -> anyhow::Result<u32> {
    let path = state.map(MAP_SOCK_SLOTS);
    let wanted = sock_slots_for(max_tracked_sockets.unwrap_or(DEFAULT_MAX_TRACKED_SOCKETS));
    if !path.exists() {
        return Ok(wanted);
    }
    let pinned = aya::maps::MapInfo::from_pin(&path)
        .map_err(|err| kernel_error(&format!("failed to read {}", path.display()), err))?
        .max_entries();
    if !pinned.is_power_of_two() {
        return Err(Error::Agent(format!(
            "{} has {pinned} slots, not a power of two, so keepalive did not make it; `{}` \
             removes the pinned state",
            path.display(),
            state.detach_command()
        ))
        .into());
    }
    if pinned != wanted {
        log::warn!(
            "keeping the {pinned} tracking slots of the pinned {MAP_SOCK_SLOTS} (this \
             max_tracked_sockets asks for {wanted}); `{}` and a restart resize it",
            state.detach_command()
        );
    }
    Ok(pinned)
}

/// Refuses pinned maps whose layout (map type, key or value size) is not this build's:
/// another build of keepalive made them, whose maps changed without a new
/// `keepalive_common::ABI_VERSION` (and so a map directory of their own). Over them the
/// kernel would reject the programs (exit 6, as if it could not run keepalive) or, worse, take
/// them and have records misread. Their capacities may differ: see [`sock_slots`].
fn check_pinned_layouts(pins: &[(&str, PathBuf)], state: &StateDir) -> anyhow::Result<()> {
    let pinned: Vec<&(&str, PathBuf)> = pins.iter().filter(|(_, path)| path.exists()).collect();
    if pinned.is_empty() {
        return Ok(());
    }
    let object = aya_obj::Object::parse(EBPF_OBJECT).context("failed to parse the BPF object")?;
    for (name, path) in pinned {
        let def = object
            .maps
            .get(*name)
            .ok_or_else(|| anyhow!("the BPF object has no {name} map"))?;
        let info = aya::maps::MapInfo::from_pin(path)
            .map_err(|err| kernel_error(&format!("failed to read {}", path.display()), err))?;
        let layout = |kind: Option<u32>, key: u32, value: u32| {
            format!(
                "type {}, {key}-byte keys, {value}-byte values",
                kind.map_or("unknown".to_owned(), |kind| kind.to_string())
            )
        };
        // The type's number, as the object and the kernel give it.
        let kind = info.map_type().ok().map(|kind| kind as u32);
        let theirs = layout(kind, info.key_size(), info.value_size());
        let ours = layout(Some(def.map_type()), def.key_size(), def.value_size());
        if theirs != ours {
            return Err(Error::Agent(format!(
                "{} is not this build's {name} map ({theirs}; this build's has {ours}): \
                 another build of keepalive made it; `{}` removes the pinned state, ending \
                 enforcement until the agent starts again",
                path.display(),
                state.detach_command()
            ))
            .into());
        }
    }
    Ok(())
}

/// Marks the start of an apply pass (see `keepalive_common::MAP_APPLY`).
fn start_apply_pass(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let map = ebpf
        .map_mut(MAP_APPLY)
        .ok_or_else(|| anyhow!("the BPF object has no {MAP_APPLY} map"))?;
    let mut array: aya::maps::Array<&mut MapData, u64> = map.try_into()?;
    array
        .set(0, crate::status::monotonic_now_ns(), 0)
        .context("failed to start the apply pass")?;
    Ok(())
}

/// The oldest kernel (major, minor) keepalive supports: the first whose TCP iterator can call
/// bpf_setsockopt.
pub const MIN_KERNEL: (u32, u32) = (5, 15);

/// Says that the table a previous agent left pinned could not be held through its replacement,
/// as a warning where that matters: before Linux 6.8, whose fix for CVE-2023-52447 stable
/// releases may lack.
fn warn_unheld(err: &MapError) {
    let message = format!(
        "cannot open the policy table the previous agent installed, to hold it while this one \
         replaces it ({err}; opening a map by id takes CAP_SYS_ADMIN)"
    );
    match kernel_version() {
        Some((major, minor, _)) if (major, minor) >= (6, 8) => log::debug!("{message}"),
        _ => log::warn!(
            "{message}: kernels before 6.8 without the fix for CVE-2023-52447 may free it while \
             a program still reads it"
        ),
    }
}

/// The running kernel's major and minor version, and its release string.
pub fn kernel_version() -> Option<(u32, u32, String)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let release = release.trim().to_owned();
    let mut parts = release.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor, release))
}

/// Whether the kernel refused an iterator for lacking what it needs: no such iterator in its
/// BTF, or, before [`MIN_KERNEL`], a helper it does not offer to iterators. Any other
/// rejection is a fault in the program: from [`MIN_KERNEL`] on, the kernel offers every helper
/// the iterator may call, so a helper it refuses there is one the build must not call.
pub fn lacks_iterator_support(err: &ProgramError) -> bool {
    let older = kernel_version().is_none_or(|(major, minor, _)| (major, minor) < MIN_KERNEL);
    match err {
        ProgramError::Btf(_) => true,
        ProgramError::LoadError { verifier_log, .. } => {
            older && refuses_a_helper(&verifier_log.to_string())
        }
        _ => false,
    }
}

/// Whether a verifier log rejects a helper that the kernel does not know or does not offer to
/// this program type (the messages of `check_helper_call` in `kernel/bpf/verifier.c`, each
/// naming the helper as `name#id`).
fn refuses_a_helper(log: &str) -> bool {
    log.lines().any(|line| {
        [
            "invalid func ",
            "unknown func ",
            "program of this type cannot use helper ",
        ]
        .iter()
        .any(|message| line.starts_with(message) && line.contains('#'))
    })
}

/// Why [`probe`] found a program rejected.
#[derive(Debug, Clone)]
pub struct Rejection {
    /// The error, with the verifier's output.
    pub reason: String,
    /// The kernel lacks what the program needs (see [`lacks_iterator_support`]), rather than
    /// rejecting the program itself.
    pub unsupported: bool,
    /// The kernel had no memory for a map at the size the capacity settings give it.
    pub no_memory: bool,
}

impl From<String> for Rejection {
    fn from(reason: String) -> Self {
        Self {
            reason,
            unsupported: false,
            no_memory: false,
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Loads every program with private, unpinned maps and drops them again: what `check` uses
/// to tell whether this kernel accepts them. Nothing is attached or pinned. The maps have the
/// sizes given (`None`: the built-in ones), as a start that creates them would.
pub fn probe(
    btf: &Btf,
    max_tracked_cgroups: Option<u32>,
    max_tracked_sockets: Option<u32>,
) -> Vec<(&'static str, Result<(), Rejection>)> {
    let fail_all_with = |rejection: Rejection| {
        [PROG_SOCKOPS, PROG_LOCK, PROG_APPLY, PROG_STATUS]
            .into_iter()
            .map(|p| (p, Err(rejection.clone())))
            .collect()
    };
    let fail_all = |why: String| fail_all_with(Rejection::from(why));
    if !object_available() {
        return fail_all("this binary was built without its BPF object".into());
    }
    let offsets = match btf.kernel_offsets() {
        Ok(offsets) => offsets,
        Err(err) => return fail_all(err.to_string()),
    };
    let settings = Settings::default();
    let mut loader = EbpfLoader::new();
    loader
        .override_global(GLOBAL_OFFSETS, &offsets, true)
        .override_global(GLOBAL_SETTINGS, &settings, true)
        .override_global(aya_log::LEVEL, &0u8, false);
    if let Some(max) = max_tracked_cgroups {
        loader.map_max_entries(MAP_CGSTATS, max);
    }
    if let Some(max) = max_tracked_sockets {
        loader.map_max_entries(MAP_SOCKS, max);
    }
    let slots = sock_slots_for(max_tracked_sockets.unwrap_or(DEFAULT_MAX_TRACKED_SOCKETS));
    loader.map_max_entries(MAP_SOCK_SLOTS, slots);
    loader.map_max_entries(MAP_SLOT_CHUNKS, slot_chunks_for(slots));
    let mut ebpf = match loader.load(EBPF_OBJECT) {
        Ok(ebpf) => ebpf,
        Err(err) => {
            return match no_memory(&err, max_tracked_cgroups, max_tracked_sockets) {
                Some(reason) => fail_all_with(Rejection {
                    reason,
                    unsupported: false,
                    no_memory: true,
                }),
                None => fail_all(format!("{err:#}")),
            };
        }
    };
    let aya_btf = match aya::Btf::from_sys_fs() {
        Ok(btf) => btf,
        Err(err) => return fail_all(format!("{err:#}")),
    };
    let describe = |result: Result<(), ProgramError>| {
        result.map_err(|err| Rejection {
            reason: format!("{err:#}"),
            unsupported: lacks_iterator_support(&err),
            no_memory: false,
        })
    };
    let mut results = Vec::new();
    results.push((
        PROG_SOCKOPS,
        program::<SockOps>(&mut ebpf, PROG_SOCKOPS)
            .map_err(|err| Rejection::from(err.to_string()))
            .and_then(|p| describe(p.load())),
    ));
    results.push((
        PROG_LOCK,
        program::<CgroupSockopt>(&mut ebpf, PROG_LOCK)
            .map_err(|err| Rejection::from(err.to_string()))
            .and_then(|p| describe(p.load())),
    ));
    let mut load_iter = |name: &str, kind: &str| {
        program::<Iter>(&mut ebpf, name)
            .map_err(|err| Rejection::from(err.to_string()))
            .and_then(|p| describe(p.load(kind, &aya_btf)))
    };
    results.push((PROG_APPLY, load_iter(PROG_APPLY, "tcp")));
    // The two status iterators (one per tracking table) are one feature.
    let status = load_iter(PROG_STATUS, "bpf_map_elem")
        .and_then(|()| load_iter(PROG_STATUS_SLOTS, "bpf_map_elem"));
    results.push((PROG_STATUS, status));
    results
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("the BPF object has no program {name}"))?;
    Ok(prog.try_into()?)
}

/// Pins `fd` at `path`, atomically replacing whatever is pinned there.
fn replace_pin(fd: std::os::fd::BorrowedFd<'_>, path: &Path) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(crate::pin::TMP_PIN_SUFFIX);
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    sys::obj_pin(fd, &tmp).with_context(|| format!("failed to pin {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("failed to pin {}", path.display()))
}

/// The name a pin goes by in messages.
fn pin_name(path: &Path) -> String {
    path.file_name()
        .unwrap_or(path.as_os_str())
        .to_string_lossy()
        .into_owned()
}

/// Swaps `prog` into the link pinned at `pin`, or attaches it to `cgroup` and pins the link
/// there; the link, and whether it was pinned already.
fn attach_or_update(
    prog: std::os::fd::BorrowedFd<'_>,
    cgroup: &File,
    attach_type: u32,
    pin: &Path,
) -> anyhow::Result<(OwnedFd, bool)> {
    match sys::obj_get(pin) {
        Ok(link) => {
            sys::link_update(link.as_fd(), prog).with_context(|| {
                format!("failed to replace the program behind {}", pin.display())
            })?;
            Ok((link, true))
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            let link = sys::cgroup_link_create(prog, cgroup.as_fd(), attach_type)
                // ENOENT: the cgroup was removed meanwhile, which the caller tells.
                .map_err(|err| {
                    kernel_error_but(
                        "failed to attach to the cgroup",
                        err,
                        &[libc::ENOMEM, libc::ENOENT],
                    )
                })?;
            sys::obj_pin(link.as_fd(), pin)
                .with_context(|| format!("failed to pin {}", pin.display()))?;
            Ok((link, false))
        }
        Err(err) => Err(err).with_context(|| format!("failed to open {}", pin.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_out_of_memory_or_a_removed_cgroup_is_no_exit_6() {
        // A map of no capacity setting's.
        let errno = |n| {
            EbpfError::MapError(MapError::CreateError {
                name: "KA_COUNTERS".to_owned(),
                io_error: io::Error::from_raw_os_error(n),
            })
        };
        let load = |n| crate::error::code_of(&kernel_error("load", errno(n)));
        // Exit 1, which the unit retries.
        assert_eq!(load(libc::ENOMEM), None);
        assert_eq!(load(libc::EINVAL), Some(crate::error::exit::KERNEL));
        assert_eq!(load(libc::ENOENT), Some(crate::error::exit::KERNEL));
        let attach = |n| {
            let err = io::Error::from_raw_os_error(n);
            crate::error::code_of(&kernel_error_but(
                "attach",
                err,
                &[libc::ENOMEM, libc::ENOENT],
            ))
        };
        assert_eq!(attach(libc::ENOENT), None);
        assert_eq!(attach(libc::E2BIG), Some(crate::error::exit::KERNEL));
    }

    #[test]
    fn only_a_refused_helper_counts_as_an_unsupported_iterator() {
        // What kernels before 5.15 print for the iterator's bpf_setsockopt and sk_storage calls.
        for log in [
            "0: R1=ctx() R10=fp0\n; 12: (85) call bpf_setsockopt#49\nunknown func bpf_setsockopt#49\n",
            "program of this type cannot use helper bpf_sk_storage_get#107\n",
            "invalid func unknown#212\n",
        ] {
            assert!(refuses_a_helper(log), "{log}");
        }
        // A fault in the program or its BTF, whatever the kernel.
        for log in [
            "R1 pointer arithmetic on map_ptr prohibited\nprocessed 331 insns\n",
            "invalid access to map value, value_size=128 off=128 size=8\n",
            "invalid func info rec size 12\n",
            "helper call is not allowed in probe\n",
            "",
        ] {
            assert!(!refuses_a_helper(log), "{log}");
        }
    }
}
