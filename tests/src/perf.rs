//! What the performance guard (`tests/perf.rs`) and `cargo xtask bench` share: the connection
//! storm, interleaved batches of it, the realistic policy set, and the sock_ops program's own
//! time from `bpf_stats`.

use std::{fmt::Write as _, fs, time::Duration};

use crate::{Proc, TempConfig, TestCgroup, bpf::fdinfos, sock_bin, write_config};

/// One `ka-sock storm` of `n` lock-step loopback connections in `cgroup`, with extra
/// environment (for LD_PRELOAD); returns connections per second. The timeout only catches a
/// stuck storm: thousands of connections take well under a second.
pub fn storm(cgroup: &TestCgroup, n: u64, env: &[(&str, &str)]) -> f64 {
    let mut proc = Proc::spawn_with_env(
        &sock_bin(),
        &["storm", &n.to_string()],
        Some(cgroup.path()),
        None,
        env,
    );
    proc.next(Duration::from_secs(60 + n / 100))["per_second"]
        .as_f64()
        .expect("storm rate")
}

/// Connections per batch of [`Storms`] in interleaved rate measurements: about 7 ms of storm
/// here, short enough that set-ups taking turns see the same host.
pub const BATCH: u64 = 200;

/// A `ka-sock storms` helper in a cgroup: storms on demand from one process, so that set-ups
/// can take turns batch by batch. Single storms of thousands of connections on this VM vary
/// by about 10 %, and that variation follows the host over tens of milliseconds, so ratios of
/// short batches run back to back cancel most of it where ratios of whole storms do not.
pub struct Storms(Proc);

impl Storms {
    /// The helper in `cgroup`, with extra environment (see [`storm`]).
    pub fn new(cgroup: &TestCgroup, env: &[(&str, &str)]) -> Self {
        let mut proc =
            Proc::spawn_with_env(&sock_bin(), &["storms"], Some(cgroup.path()), None, env);
        proc.next(Duration::from_secs(10));
        Self(proc)
    }

    /// One batch of `n` connections; connections per second.
    pub fn run(&mut self, n: u64) -> f64 {
        self.0.send(&n.to_string());
        self.0.next(Duration::from_secs(60 + n / 100))["per_second"]
            .as_f64()
            .expect("storm rate")
    }
}

/// `rounds` measurements of every set-up, interleaved: each round starts one set-up further
/// on, and every other cycle of `N` rounds goes through them backwards, so none always runs
/// first, nor (with more than two) always after the same other one.
pub fn interleaved<S, const N: usize>(
    rounds: usize,
    setups: &mut [S; N],
    mut measure: impl FnMut(&mut S) -> f64,
) -> [Vec<f64>; N] {
    let mut values = [const { Vec::new() }; N];
    for i in 0..rounds {
        let backwards = (i / N) % 2 == 1;
        for k in 0..N {
            let step = if backwards { N - k } else { k };
            let which = (i + step) % N;
            values[which].push(measure(&mut setups[which]));
        }
    }
    values
}

/// Round-by-round ratios `a[i] / b[i]`.
pub fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(a, b)| a / b).collect()
}

/// A reference sock_ops program from `ka-sock`, attached to `cgroup` while the returned
/// process lives: `"empty-sockops"` (returns at once), `"minimal-sockops"` (four
/// bpf_setsockopt calls with fixed values at ESTABLISHED, on both ends) or `"floor-sockops"`
/// (the same on the connecting end and on listeners, which accepted ends inherit).
pub fn reference_program(kind: &str, cgroup: &TestCgroup) -> Proc {
    let dir = cgroup.path().to_str().expect("cgroup path");
    let mut proc = Proc::spawn(&sock_bin(), &[kind, dir], None, None);
    proc.next(Duration::from_secs(10));
    proc
}

/// A realistic policy set for an agent attached at `enforced`: the default plus one policy
/// for each of 300 child cgroups, created here. Returns the config file and the cgroups, which
/// must live as long as the agent.
pub fn realistic_policies(enforced: &TestCgroup) -> (TempConfig, Vec<TestCgroup>) {
    let mut config = String::from("[default]\nidle = 60\ninterval = 10\ncount = 5\n");
    let services: Vec<TestCgroup> = (0..300)
        .map(|i| enforced.child(&format!("svc-{i}")))
        .collect();
    for (i, svc) in services.iter().enumerate() {
        let _ = writeln!(
            config,
            "[[policy]]\ncgroup = \"{}\"\nidle = {}\n",
            svc.rel(),
            30 + i % 60
        );
    }
    (write_config(&config), services)
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `kernel.bpf_stats_enabled` held at one value while it lives; the previous value comes back
/// on drop, also when the measurement panics.
pub struct BpfStats {
    saved: String,
}

impl BpfStats {
    /// Statistics on, for `run_time_ns`/`run_cnt`.
    pub fn enable() -> Self {
        Self::set("1")
    }

    /// Statistics off, for timing: they add two clock reads to every program run (about 70 ns
    /// per run on this VM, what the empty program measures), which an enforced storm pays and
    /// a plain one does not. A run killed while they were on (Drop never ran) leaves them on.
    pub fn disable() -> Self {
        let stats = Self::set("0");
        if stats.saved.trim() != "0" {
            eprintln!(
                "note: kernel.bpf_stats_enabled was {}; off while rates are measured",
                stats.saved.trim()
            );
        }
        stats
    }

    fn set(value: &str) -> Self {
        let saved = fs::read_to_string(BPF_STATS).expect("read bpf_stats_enabled");
        fs::write(BPF_STATS, value).expect("write bpf_stats_enabled");
        Self { saved }
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, self.saved.trim());
    }
}

/// run_time_ns and run_cnt of the sock_ops program that process `pid` holds, from its fdinfo.
pub fn sockops_stats(pid: u32) -> (u64, u64) {
    let info = fdinfos(pid)
        .into_iter()
        .find(|info| info.field("prog_type") == Some(13))
        .unwrap_or_else(|| panic!("process {pid} holds no sock_ops program"));
    let field = |name| info.field(name).expect("bpf_stats field");
    (field("run_time_ns"), field("run_cnt"))
}

/// The sock_ops program time (ns) and runs that `storms` storms of `n` connections in `cgroup`
/// cost the agent `pid`, with `bpf_stats` on for them only.
pub fn program_cost(pid: u32, cgroup: &TestCgroup, n: u64, storms: u64) -> (u64, u64) {
    let _stats = BpfStats::enable();
    let (t0, c0) = sockops_stats(pid);
    for _ in 0..storms {
        storm(cgroup, n, &[]);
    }
    let (t1, c1) = sockops_stats(pid);
    (t1 - t0, c1 - c0)
}

/// The median; sorts `values`.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The first quartile, the median and the third quartile; sorts `values`.
pub fn quartiles(values: &mut [f64]) -> [f64; 3] {
    let median = median(values);
    let quartile = |q: usize| values[(values.len() - 1) * q / 4];
    [quartile(1), median, quartile(3)]
}
