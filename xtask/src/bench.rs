//! `cargo xtask bench`: the performance claims, measured on this machine.
//!
//! Every comparison is a ratio of runs interleaved in one session after a warm-up, reported as
//! the median with min–max; absolute numbers are context only. Everything runs in cgroups of
//! its own, against loopback, with bounded loops, and is torn down afterwards.

use std::{
    fmt::Write as _,
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use keepalive_tests::{
    Agent, AgentDirs, Proc, TestCgroup,
    perf::{
        BATCH, BpfStats, Storms, interleaved, median, program_cost, quartiles, ratios,
        realistic_policies, reference_program, sockops_stats,
    },
};
use serde_json::Value;

struct Row {
    what: String,
    result: String,
    goal: &'static str,
}

/// The median with min–max.
fn spread(values: &mut [f64]) -> String {
    let m = median(values);
    format!("{m:.3} ({:.3}–{:.3})", values[0], values[values.len() - 1])
}

/// The median with the middle half and min–max, for ratios of short batches, whose extremes
/// say little.
fn middle_half(values: &mut [f64]) -> String {
    let [q1, m, q3] = quartiles(values);
    format!(
        "{m:.3} (middle half {q1:.3}–{q3:.3}, all {:.3}–{:.3})",
        values[0],
        values[values.len() - 1]
    )
}

fn connection_rate(rows: &mut Vec<Row>, quick: bool) -> anyhow::Result<()> {
    // Many short rounds, one batch of each set-up per round: the median of 1500 such ratios
    // moved by well under 1 % between runs of the same code, where the median of 100 rounds
    // of whole 3000-connection storms, one process each, moved by ±1.5 %.
    let n = BATCH;
    let rounds = if quick { 150 } else { 1500 };
    let parent = TestCgroup::new("bench-rate");
    let plain = parent.child("plain");
    let shimmed = parent.child("shim");
    let empty = parent.child("empty");
    let minimal = parent.child("minimal");
    let enforced = parent.child("enforced");
    let app_keepalive = parent.child("app-keepalive");
    let floor = parent.child("floor");
    let (config, services) = realistic_policies(&enforced);
    let agent = Agent::start(&enforced, &["--config", config.to_str().unwrap()]);
    // (e): a sock_ops program that returns at once, for the part of the cost that any sock_ops
    // program pays (the kernel calls it about nine times per connection).
    let empty_program = reference_program("empty-sockops", &empty);
    // (m): the least any sock_ops enforcer does, fixed values set at ESTABLISHED with no policy
    // lookup or tracking; what (b) costs beyond it is what keepalive's features cost.
    let minimal_program = reference_program("minimal-sockops", &minimal);
    // (l): the least any enforcer can do, the values set on the connecting end and on the
    // listener, which the accepted end inherits as keepalive-agent's do: whether the goal is
    // within reach of any sock_ops enforcer on this host.
    let floor_program = reference_program("floor-sockops", &floor);
    let preload = [("LD_PRELOAD", keepalive_tests::shim_lib())];
    // (k): keepalive switched on by the application, with one setsockopt per connection: what
    // keepalive itself costs (its timer), without any enforcer.
    let own_keepalive = [("KA_STORM_KEEPALIVE", "1")];
    let mut setups = [
        Storms::new(&plain, &[]),
        Storms::new(&shimmed, &preload),
        Storms::new(&empty, &[]),
        Storms::new(&enforced, &[]),
        Storms::new(&app_keepalive, &own_keepalive),
        Storms::new(&minimal, &[]),
        Storms::new(&floor, &[]),
    ];
    // Warm-up.
    interleaved(10, &mut setups, |storms| storms.run(n));
    // Rates are measured with bpf_stats off, as in production: the statistics add clock reads
    // to every program run.
    let stats_off = BpfStats::disable();
    let [a, c, e, b, k, m, l] = interleaved(rounds, &mut setups, |storms| storms.run(n));
    drop(stats_off);
    drop(setups);
    let total = |rates: &[f64]| rates.iter().map(|rate| 1.0 / rate).sum::<f64>();
    eprintln!(
        "xtask bench: total time of {rounds} batches of {n}: plain {:.2} s, shim {:.2} s, \
         empty program {:.2} s, enforced {:.2} s, application keepalive {:.2} s, minimal \
         enforcer {:.2} s, floor enforcer {:.2} s",
        total(&a) * n as f64,
        total(&c) * n as f64,
        total(&e) * n as f64,
        total(&b) * n as f64,
        total(&k) * n as f64,
        total(&m) * n as f64,
        total(&l) * n as f64,
    );
    let (mut l_a, mut b_l) = (ratios(&l, &a), ratios(&b, &l));
    let (mut b_a, mut c_a, mut e_a, mut b_c, mut b_e, mut k_a, mut m_a, mut b_m) = (
        ratios(&b, &a),
        ratios(&c, &a),
        ratios(&e, &a),
        ratios(&b, &c),
        ratios(&b, &e),
        ratios(&k, &a),
        ratios(&m, &a),
        ratios(&b, &m),
    );
    // The program's own time, from bpf_stats, over separate storms.
    let cost_storms = if quick { 2 } else { 4 };
    let (program_ns, program_runs) = program_cost(agent.pid(), &enforced, n, cost_storms);
    let (minimal_ns, minimal_runs) = program_cost(minimal_program.pid(), &minimal, n, cost_storms);
    // The empty program's time is the part of what the statistics add to each run (two clock
    // reads) that they time themselves: the programs' time net of it estimates what they cost
    // with the statistics off.
    let (empty_ns, empty_runs) = program_cost(empty_program.pid(), &empty, n, cost_storms);
    let stats_per_run = empty_ns as f64 / empty_runs.max(1) as f64;
    let connections = cost_storms * n;
    let per_connection_us = |ns: u64| ns as f64 / connections as f64 / 1000.0;
    let net_us = |ns: u64, runs: u64| {
        (ns as f64 - runs as f64 * stats_per_run).max(0.0) / connections as f64 / 1000.0
    };
    let mut ratio = |what: String, values: &mut Vec<f64>, goal| {
        rows.push(Row {
            what,
            result: middle_half(values),
            goal,
        })
    };
    ratio(
        format!(
            "Connection rate, keepalive-agent (b) / no enforcement (a); {rounds} rounds of \
             batches of {n}"
        ),
        &mut b_a,
        "≥ 0.98",
    );
    ratio(
        "Connection rate, empty sock_ops program (e) / no enforcement (a): the floor".into(),
        &mut e_a,
        "context",
    );
    ratio(
        "Connection rate, keepalive set by the application (k) / no enforcement (a): keepalive's own cost"
            .into(),
        &mut k_a,
        "context",
    );
    ratio(
        "Connection rate, minimal sock_ops enforcer (m) / no enforcement (a): the least an enforcer that sets every socket costs"
            .into(),
        &mut m_a,
        "context",
    );
    ratio(
        "Connection rate, floor sock_ops enforcer (l) / no enforcement (a): the least any enforcer costs, the accepted end inheriting from its listener"
            .into(),
        &mut l_a,
        "context",
    );
    ratio(
        "Connection rate, keepalive-agent (b) / minimal sock_ops enforcer (m): what policy lookup, tracking and dead-peer detection add"
            .into(),
        &mut b_m,
        "context",
    );
    ratio(
        "Connection rate, keepalive-agent (b) / floor sock_ops enforcer (l)".into(),
        &mut b_l,
        "context",
    );
    ratio(
        "Connection rate, keepalive-agent (b) / empty sock_ops program (e)".into(),
        &mut b_e,
        "context",
    );
    ratio(
        "Connection rate, LD_PRELOAD shim (c) / no enforcement (a)".into(),
        &mut c_a,
        "context",
    );
    ratio(
        "Connection rate, keepalive-agent (b) / LD_PRELOAD shim (c)".into(),
        &mut b_c,
        "context",
    );
    rows.push(Row {
        what: "sock_ops program cost (bpf_stats run_time_ns / run_cnt)".into(),
        result: format!(
            "{:.0} ns per run, {:.1} runs and {:.2} µs per connection; {:.2} µs net of the \
             statistics' own {stats_per_run:.0} ns per run (the empty program's; an estimate)",
            program_ns as f64 / program_runs.max(1) as f64,
            program_runs as f64 / connections as f64,
            per_connection_us(program_ns),
            net_us(program_ns, program_runs),
        ),
        goal: "context",
    });
    rows.push(Row {
        what: "Minimal sock_ops enforcer (m) cost (bpf_stats)".into(),
        result: format!(
            "{:.2} µs per connection; {:.2} µs net",
            per_connection_us(minimal_ns),
            net_us(minimal_ns, minimal_runs),
        ),
        goal: "context",
    });
    drop(floor_program);
    drop(minimal_program);
    drop(empty_program);
    drop(agent);
    drop(services);
    Ok(())
}

/// The storm under this build's agent and under `baseline`'s, attached to sibling cgroups with
/// the same policy set: the before and after of a change, side by side in one run.
fn against_baseline(rows: &mut Vec<Row>, baseline: &Path, quick: bool) -> anyhow::Result<()> {
    // As in `connection_rate`: many short rounds. Single rounds of program time range over
    // ±15 % here; medians of 6 rounds moved by as much as 0.15 between runs.
    let n = BATCH;
    let rounds = if quick { 280 } else { 720 };
    let parent = TestCgroup::new("bench-baseline");
    let ours_cg = parent.child("current");
    let base_cg = parent.child("baseline");
    let (ours_config, _ours_services) = realistic_policies(&ours_cg);
    let (base_config, _base_services) = realistic_policies(&base_cg);
    let ours = Agent::start(&ours_cg, &["--config", ours_config.to_str().unwrap()]);
    let base = Agent::start_in(
        &AgentDirs::new().with_bin(baseline),
        &base_cg,
        &["--config", base_config.to_str().unwrap()],
    );
    let mut setups = [
        (Storms::new(&ours_cg, &[]), ours.pid()),
        (Storms::new(&base_cg, &[]), base.pid()),
    ];
    interleaved(10, &mut setups, |(storms, _)| storms.run(n));
    // Rates with bpf_stats off, then the program's time with it on.
    let stats_off = BpfStats::disable();
    let [ours_rate, base_rate] = interleaved(rounds, &mut setups, |(storms, _)| storms.run(n));
    drop(stats_off);
    let stats = BpfStats::enable();
    // Longer batches for the program's time: its fdinfo reads around each are not timed, but
    // they take the host away from the batches.
    let [mut ours_ns, mut base_ns] = interleaved(rounds / 10, &mut setups, |(storms, pid)| {
        let (t0, _) = sockops_stats(*pid);
        storms.run(10 * n);
        let (t1, _) = sockops_stats(*pid);
        (t1 - t0) as f64 / (10 * n) as f64
    });
    drop(stats);
    rows.push(Row {
        what: format!(
            "Connection rate, this build / baseline `{}`; {rounds} rounds of batches of {n}",
            baseline.display()
        ),
        result: middle_half(&mut ratios(&ours_rate, &base_rate)),
        goal: "context",
    });
    let mut cost = ratios(&ours_ns, &base_ns);
    rows.push(Row {
        what: "sock_ops program time per connection (bpf_stats), this build / baseline".into(),
        result: format!(
            "{} ({:.2} µs vs {:.2} µs)",
            spread(&mut cost),
            median(&mut ours_ns) / 1000.0,
            median(&mut base_ns) / 1000.0
        ),
        goal: "context",
    });
    Ok(())
}

/// Parses "… existing connections: N updated, … in T ms" from the agent's log.
fn initial_apply(log: &str) -> Option<(u64, f64)> {
    let line = log.lines().find(|l| l.contains("existing connections:"))?;
    let updated = line
        .split("existing connections: ")
        .nth(1)?
        .split(' ')
        .next()?
        .parse()
        .ok()?;
    let ms = line
        .rsplit(" in ")
        .next()?
        .trim_end_matches(" ms")
        .parse()
        .ok()?;
    Some((updated, ms))
}

/// Wall time and peak RSS (KiB) of a command, via wait4.
fn timed(mut cmd: Command) -> anyhow::Result<(Duration, i64)> {
    let start = Instant::now();
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn")?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child.
    let pid = unsafe { libc::wait4(child.id() as i32, &raw mut status, 0, &raw mut usage) };
    if pid < 0 || status != 0 {
        bail!("{cmd:?} failed (status {status})");
    }
    Ok((start.elapsed(), usage.ru_maxrss))
}

fn retroactive_and_status(rows: &mut Vec<Row>, quick: bool) -> anyhow::Result<()> {
    let sizes: &[usize] = if quick {
        &[2_000, 10_000]
    } else {
        &[10_000, 100_000]
    };
    for (index, &n) in sizes.iter().enumerate() {
        let parent = TestCgroup::new("bench-retro");
        let cg = parent.child("held");
        // Processes without CAP_SYS_RESOURCE cannot raise RLIMIT_NOFILE past its hard limit
        // (20000 on the machines this runs on), so the connections are spread over helpers
        // holding at most 9000 each (18000 descriptors).
        let mut held = Vec::new();
        let mut left = n;
        while left > 0 {
            let chunk = left.min(9_000);
            held.push(Proc::sock(&["hold", &chunk.to_string()], &cg));
            left -= chunk;
        }
        for proc in &mut held {
            proc.next(Duration::from_secs(600));
        }
        eprintln!(
            "xtask bench: {n} connections open in {} processes",
            held.len()
        );
        let dirs = AgentDirs::new();
        let agent = Agent::start_in(&dirs, &parent, &["--max-tracked-sockets", "1048576"]);
        let (updated, ms) = initial_apply(&agent.log()).context("no apply report in the log")?;
        rows.push(Row {
            what: format!("Apply policy to {n} existing connections ({updated} sockets) at start"),
            result: format!("{ms:.0} ms"),
            goal: if n >= 100_000 { "< 1 s" } else { "context" },
        });
        let out = agent.cli(&["policy", "set", cg.rel(), "--idle", "45", "--json"]);
        let reply: Value = serde_json::from_slice(&out.stdout).context("policy set --json")?;
        let applied = &reply["applied"];
        rows.push(Row {
            what: format!(
                "Apply a policy change to {n} existing connections ({} sockets)",
                applied["applied"]
            ),
            result: format!(
                "{:.0} ms",
                applied["elapsed_us"].as_f64().unwrap_or(0.0) / 1000.0
            ),
            goal: if n >= 100_000 { "< 1 s" } else { "context" },
        });
        if index + 1 == sizes.len() {
            let (mut ours, mut ss, mut ours_rss, mut ss_rss) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for _ in 0..3 {
                let (t, rss) = timed(dirs.command(&["status", "--json"]))?;
                ours.push(t.as_secs_f64());
                ours_rss.push(rss as f64);
                let mut cmd = Command::new("ss");
                cmd.args(["-tno", "state", "established"]);
                let (t, rss) = timed(cmd)?;
                ss.push(t.as_secs_f64());
                ss_rss.push(rss as f64);
            }
            let mut ratio: Vec<f64> = ours.iter().zip(&ss).map(|(a, b)| a / b).collect();
            rows.push(Row {
                what: format!("`status --json` with {} enforced sockets open, time / `ss -tno state established`", 2 * n),
                result: format!(
                    "{} ({:.2} s vs {:.2} s)",
                    spread(&mut ratio),
                    median(&mut ours),
                    median(&mut ss)
                ),
                goal: "≤ 1.0",
            });
            rows.push(Row {
                what: format!(
                    "Peak memory of `status --json` vs `ss` at {} sockets",
                    2 * n
                ),
                result: format!(
                    "{:.0} MiB vs {:.0} MiB",
                    median(&mut ours_rss) / 1024.0,
                    median(&mut ss_rss) / 1024.0
                ),
                goal: "context",
            });
        }
        drop(agent);
        for mut proc in held {
            proc.close_stdin();
        }
    }
    Ok(())
}

fn proc_cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `after` starts at field 3.
    fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

fn footprint(rows: &mut Vec<Row>, quick: bool) -> anyhow::Result<()> {
    let cg = TestCgroup::new("bench-idle");
    let mut ready = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let agent = Agent::start(&cg, &[]);
        ready.push(start.elapsed().as_secs_f64() * 1000.0);
        drop(agent);
    }
    rows.push(Row {
        what: "Time from `run` to attached and ready (fresh state)".into(),
        result: format!("{:.0} ms", median(&mut ready)),
        goal: "context",
    });
    let agent = Agent::start(&cg, &[]);
    std::thread::sleep(Duration::from_secs(1));
    let secs = if quick { 5 } else { 30 };
    let before = proc_cpu_ticks(agent.pid());
    std::thread::sleep(Duration::from_secs(secs));
    let ticks = proc_cpu_ticks(agent.pid()) - before;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    rows.push(Row {
        what: format!("Idle agent over {secs} s: RSS (peak), CPU"),
        result: format!(
            "{:.1} MiB ({:.1} MiB), {:.2}% ({ticks} ticks)",
            rss_kib(agent.pid(), "VmRSS:") as f64 / 1024.0,
            rss_kib(agent.pid(), "VmHWM:") as f64 / 1024.0,
            ticks as f64 / hz / secs as f64 * 100.0
        ),
        goal: "< 20 MiB, no measurable CPU",
    });
    Ok(())
}

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "Linux {}, {} × {cpu}, {:.0} GiB",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem as f64 / 1024.0 / 1024.0
    )
}

/// Runs every benchmark, as root, against the release binaries the caller built, and prints
/// the table.
pub fn run(root: &Path, quick: bool, baseline: Option<&Path>) -> anyhow::Result<()> {
    // SAFETY: set before any thread is spawned; the harness reads them.
    unsafe {
        std::env::set_var(
            "KEEPALIVE_AGENT_BIN",
            root.join("target/release/keepalive-agent"),
        );
        std::env::set_var("KA_SOCK_BIN", root.join("target/release/ka-sock"));
    }
    let mut rows = Vec::new();
    connection_rate(&mut rows, quick)?;
    if let Some(baseline) = baseline {
        against_baseline(&mut rows, baseline, quick)?;
    }
    retroactive_and_status(&mut rows, quick)?;
    footprint(&mut rows, quick)?;

    let date = Command::new("date").arg("-u").arg("+%Y-%m-%d").output()?;
    let mut md = format!(
        "Measured {} on {}{}.\n\n| Measurement | Result | Goal |\n|---|---|---|\n",
        String::from_utf8_lossy(&date.stdout).trim(),
        machine(),
        if quick { " (quick run)" } else { "" }
    );
    for row in &rows {
        let _ = writeln!(md, "| {} | {} | {} |", row.what, row.result, row.goal);
    }
    // Printed first: a table that cannot be written is not lost with it.
    println!("{md}");
    let out = root.join("target/bench/results.md");
    fs::create_dir_all(root.join("target/bench"))
        .and_then(|()| fs::write(&out, &md))
        .with_context(|| format!("failed to write {}", out.display()))?;
    println!("written to {}", out.display());
    Ok(())
}
