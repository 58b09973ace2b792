//! The parallelism bound end to end: four independent stages that mostly sleep. By default
//! only CPU-busy steps count against the core-count bound, so all four sleep at once (on
//! this 2-core machine too); an explicit `--max-parallelism 2` is a hard bound. Each step
//! stamps /proc/uptime (not namespaced, so stamps of different sandboxes compare) when it
//! starts and ends; the final stage copies the stamps out.

use std::path::Path;

use crate::common::*;

const STAGES: usize = 4;

fn dockerfile() -> String {
    let mut df = String::new();
    for i in 0..STAGES {
        // `echo {i}` keeps the four RUNs distinct ops (identical ones would be one node).
        df.push_str(&format!(
            "FROM {}/busybox:latest AS s{i}\n\
             RUN echo {i} > /id && cut -d' ' -f1 /proc/uptime > /start && sleep 1 && \
             cut -d' ' -f1 /proc/uptime > /end\n",
            registry()
        ));
    }
    df.push_str("FROM scratch\n");
    for i in 0..STAGES {
        df.push_str(&format!("COPY --from=s{i} /start /end /{i}/\n"));
    }
    df
}

/// Builds with `extra` args and returns each stage's (start, end) uptime stamps.
fn intervals(env: &TestEnv, name: &str, extra: &[&str]) -> Vec<(f64, f64)> {
    let ctx = env.path(&format!("{name}-ctx"));
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), dockerfile()).unwrap();
    let out = env.path(&format!("{name}-out"));
    let dest = format!("type=local,dest={}", out.display());
    let mut args = vec!["--no-cache", "--output", dest.as_str()];
    args.extend_from_slice(extra);
    args.push(ctx.to_str().unwrap());
    env.build_ok(&args);
    let stamp = |p: &Path| -> f64 {
        let text = std::fs::read_to_string(p).unwrap();
        text.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{}: {text:?}: {e}", p.display()))
    };
    (0..STAGES)
        .map(|i| {
            let dir = out.join(i.to_string());
            (stamp(&dir.join("start")), stamp(&dir.join("end")))
        })
        .collect()
}

/// The most intervals that contain one instant (half-open: a step that starts as another
/// ends does not overlap it).
fn most_at_once(intervals: &[(f64, f64)]) -> usize {
    intervals
        .iter()
        .map(|&(t, _)| {
            intervals
                .iter()
                .filter(|&&(start, end)| start <= t && t < end)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn sleeping_stages_all_overlap_by_default_but_not_beyond_an_explicit_bound() {
    let env = TestEnv::new();
    let soft = intervals(&env, "default", &[]);
    if strata_sandbox::cpu_metering_available() {
        assert_eq!(most_at_once(&soft), STAGES, "intervals: {soft:?}");
    } else {
        // No writable cgroup2 here: steps are not metered and the default is a plain
        // bound at the core count.
        eprintln!("no writable cgroup2: checking the default as a plain bound");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(most_at_once(&soft) <= cores, "intervals: {soft:?}");
    }

    let hard = intervals(&env, "bounded", &["--max-parallelism", "2"]);
    assert!(most_at_once(&hard) <= 2, "intervals: {hard:?}");
    // The bound still allows two at once.
    assert_eq!(most_at_once(&hard), 2, "intervals: {hard:?}");
}
