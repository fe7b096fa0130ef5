//! A quick regression guard on the per-connection cost: a loopback connection storm in an
//! enforced cgroup must keep at least 80% of the rate of the same storm in a cgroup without
//! enforcement, as a median over interleaved pairs. The real numbers come from
//! `cargo xtask bench` (README, "Performance"); this only catches regressions, with a floor
//! loose enough that timing noise on a shared 2-core VM does not make it flaky: single pairs
//! there range over +-15%, and a regression that doubles the program's cost falls below it.
//!
//! Run alone (`cargo xtask test` does): parallel tests would skew the timing.

use keepalive_tests::{Agent, Proc, TestCgroup, write_config};

const CONNECTIONS: &str = "4000";
const PAIRS: usize = 7;
const FLOOR: f64 = 0.80;

fn rate(cgroup: &TestCgroup) -> f64 {
    let mut storm = Proc::sock(&["storm", CONNECTIONS], cgroup);
    let out = storm.next(std::time::Duration::from_secs(120));
    out["per_second"].as_f64().expect("rate")
}

#[test]
#[ignore = "timing-sensitive: run alone by `cargo xtask test`"]
fn enforcement_keeps_the_connection_rate_within_noise() {
    let parent = TestCgroup::new("perf");
    let plain = parent.child("plain");
    let enforced = parent.child("enforced");
    // A realistic set: the default plus a few hundred cgroup policies (most for cgroups that
    // do not exist, as on a host where containers come and go) and status tracking, which is
    // always on.
    let mut config = String::from("[default]\nidle = 60\ninterval = 10\ncount = 5\n");
    for i in 0..300 {
        config.push_str(&format!(
            "[[policy]]\ncgroup = \"{}/svc-{i}\"\nidle = {}\n",
            enforced.rel(),
            30 + i % 60
        ));
    }
    let config = write_config(&config);
    let _agent = Agent::start(&enforced, &["--config", config.to_str().unwrap()]);
    // Warm-up.
    rate(&plain);
    rate(&enforced);
    let mut ratios = Vec::new();
    for i in 0..PAIRS {
        let (a, b) = if i % 2 == 0 {
            let a = rate(&plain);
            (a, rate(&enforced))
        } else {
            let b = rate(&enforced);
            (rate(&plain), b)
        };
        ratios.push(b / a);
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[PAIRS / 2];
    eprintln!("enforced/plain connection rate ratios: {ratios:.3?}, median {median:.3}");
    assert!(
        median >= FLOOR,
        "enforcement costs too much: median rate ratio {median:.3} < {FLOOR} ({ratios:.3?})"
    );
}
