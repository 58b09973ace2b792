//! The solver end to end: what invalidates a step's cache (content, mode, owner; not an
//! ignored file; an ARG only for the steps after it), which stages run (`--target`,
//! `--no-cache-filter`), and two builds at once on one store sharing a step.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::common::*;

fn context(env: &TestEnv, name: &str, dockerfile: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = env.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    for (path, content) in files {
        std::fs::write(dir.join(path), content).unwrap();
    }
    dir
}

fn base() -> String {
    format!("{}/busybox:latest", registry())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn content_and_mode_changes_are_misses_and_only_their_copy_reruns() {
    let env = TestEnv::new();
    let df = format!(
        "FROM {}\nRUN echo before > /before\nCOPY data.txt /data.txt\nRUN cat /data.txt > /seen\n",
        base()
    );
    let ctx = context(&env, "ctx", &df, &[("data.txt", "one\n")]);
    let file = ctx.join("data.txt");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    env.build_ok(&[s(&ctx)]);
    assert_eq!(
        executed_steps(&env.build_ok(&[s(&ctx)])),
        Vec::<String>::new()
    );

    let reruns = |why: &str| {
        let out = env.build_ok(&[s(&ctx)]);
        let ran = executed_steps(&out);
        assert_eq!(ran.len(), 2, "{why}: {ran:?}");
        assert!(ran[0].contains("COPY data.txt"), "{why}: {ran:?}");
        assert!(ran[1].contains("RUN cat /data.txt"), "{why}: {ran:?}");
        assert!(
            cached_steps(&out)
                .iter()
                .any(|c| c.contains("RUN echo before")),
            "{why}: {out}"
        );
    };
    std::fs::write(&file, "two\n").unwrap();
    reruns("content");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    reruns("mode");
    // Nothing changed since: a hit again.
    assert_eq!(
        executed_steps(&env.build_ok(&[s(&ctx)])),
        Vec::<String>::new()
    );
}

/// The owner of a context file never reaches the image (COPY without --chown makes 0:0,
/// as BuildKit does: the docker client sends the context with uid/gid reset to 0), so it
/// is not part of the key either: a chown is a hit, and the image still has 0:0.
#[test]
fn an_owner_change_in_the_context_is_a_hit_because_copies_are_root_owned() {
    let env = TestEnv::new();
    let df = format!("FROM {}\nCOPY data.txt /data.txt\n", base());
    let ctx = context(&env, "ctx", &df, &[("data.txt", "one\n")]);
    let file = ctx.join("data.txt");
    std::os::unix::fs::chown(&file, Some(1234), Some(1234)).unwrap();
    env.build_ok(&[s(&ctx)]);
    std::os::unix::fs::chown(&file, Some(4321), Some(4321)).unwrap();
    let tar = env.path("img.tar");
    let out = env.build_ok(&[
        "--output",
        &format!("type=oci,dest={}", tar.display()),
        s(&ctx),
    ]);
    assert_eq!(executed_steps(&out), Vec::<String>::new(), "{out}");
    let rootfs = env.unpack_oci_archive(&tar, "img");
    let md = std::fs::metadata(rootfs.join("data.txt")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((md.uid(), md.gid()), (0, 0));
}

#[test]
fn a_change_to_an_ignored_file_is_a_hit() {
    let env = TestEnv::new();
    let df = format!("FROM {}\nCOPY . /app\nRUN ls /app > /listing\n", base());
    let ctx = context(
        &env,
        "ctx",
        &df,
        &[
            (".dockerignore", "ignored.txt\n"),
            ("kept.txt", "kept\n"),
            ("ignored.txt", "first\n"),
        ],
    );
    let out_dir = env.path("out");
    let out = format!("type=local,dest={}", out_dir.display());
    env.build_ok(&["--output", &out, s(&ctx)]);
    let listing = std::fs::read_to_string(out_dir.join("listing")).unwrap();
    assert!(listing.contains("kept.txt"), "{listing}");
    assert!(!listing.contains("ignored.txt"), "{listing}");

    std::fs::write(ctx.join("ignored.txt"), "second, longer content\n").unwrap();
    let again = env.build_ok(&[s(&ctx)]);
    assert_eq!(executed_steps(&again), Vec::<String>::new(), "{again}");

    // The same change to a file that is not ignored is a miss (the test can fail).
    std::fs::write(ctx.join("kept.txt"), "kept, changed\n").unwrap();
    let changed = env.build_ok(&[s(&ctx)]);
    assert!(
        executed_steps(&changed)
            .iter()
            .any(|r| r.contains("COPY . /app")),
        "{changed}"
    );
}

#[test]
fn an_arg_change_reruns_only_the_steps_after_it_that_see_it() {
    let env = TestEnv::new();
    let df = format!(
        "FROM {b} AS other\nRUN echo other > /other\n\
         FROM {b}\nRUN echo first > /first\nARG V=a\nCOPY --from=other /other /other\n\
         RUN echo \"v=$V\" > /v\n",
        b = base()
    );
    let ctx = context(&env, "ctx", &df, &[]);
    let out_dir = env.path("out");
    let out = format!("type=local,dest={}", out_dir.display());
    env.build_ok(&["--build-arg", "V=a", "--output", &out, s(&ctx)]);
    assert_eq!(std::fs::read_to_string(out_dir.join("v")).unwrap(), "v=a\n");

    let second = env.build_ok(&["--build-arg", "V=b", "--output", &out, s(&ctx)]);
    let ran = executed_steps(&second);
    assert_eq!(ran.len(), 1, "{ran:?}");
    assert!(ran[0].contains("RUN echo \"v=$V\""), "{ran:?}");
    assert_eq!(std::fs::read_to_string(out_dir.join("v")).unwrap(), "v=b\n");
    assert_eq!(
        std::fs::read_to_string(out_dir.join("first")).unwrap(),
        "first\n"
    );
}

#[test]
fn a_stage_the_target_does_not_need_never_runs() {
    let env = TestEnv::new();
    let df = format!(
        "FROM {b} AS broken\nRUN echo broken-ran && exit 3\n\
         FROM {b} AS base\nRUN echo base > /base\n\
         FROM base AS good\nRUN echo good > /good\n\
         FROM good AS last\nRUN echo last-ran && exit 4\n",
        b = base()
    );
    let ctx = context(&env, "ctx", &df, &[]);
    let out_dir = env.path("out");
    let out = format!("type=local,dest={}", out_dir.display());
    let log = env.build_ok(&["--target", "good", "--output", &out, s(&ctx)]);
    assert!(
        !log.contains("broken-ran") && !log.contains("last-ran"),
        "{log}"
    );
    assert_eq!(
        std::fs::read_to_string(out_dir.join("good")).unwrap(),
        "good\n"
    );
    assert!(out_dir.join("base").exists());

    // Without --target the last stage is built, and its RUN does fail: the check above
    // is not vacuous.
    let failed = env.build(&[s(&ctx)]);
    assert!(!failed.status.success());
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(err.contains("last-ran"), "{err}");
    assert!(!err.contains("broken-ran"), "{err}");
}

#[test]
fn no_cache_filter_re_makes_the_named_stage_and_keeps_the_others() {
    let env = TestEnv::new();
    let rand = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let df = format!(
        "FROM {b} AS a\nRUN {rand} > /a\n\
         FROM {b} AS b\nRUN {rand} > /b\n\
         FROM {b}\nCOPY --from=a /a /a\nCOPY --from=b /b /b\n",
        b = base()
    );
    let ctx = context(&env, "ctx", &df, &[]);
    let read = |dir: &Path| {
        (
            std::fs::read_to_string(dir.join("a")).unwrap(),
            std::fs::read_to_string(dir.join("b")).unwrap(),
        )
    };
    let first = env.path("first");
    env.build_ok(&[
        "--output",
        &format!("type=local,dest={}", first.display()),
        s(&ctx),
    ]);
    let second = env.path("second");
    let out = env.build_ok(&[
        "--no-cache-filter",
        "a",
        "--output",
        &format!("type=local,dest={}", second.display()),
        s(&ctx),
    ]);
    let ran = executed_steps(&out);
    assert!(ran.iter().any(|r| r.starts_with("[a 2/2] RUN")), "{ran:?}");
    assert!(!ran.iter().any(|r| r.starts_with("[b ")), "{ran:?}");
    let (a1, b1) = read(&first);
    let (a2, b2) = read(&second);
    assert_eq!(a1.len(), 32);
    assert_ne!(a1, a2, "stage a was not re-made");
    assert_eq!(b1, b2, "stage b was re-made");
}

#[test]
fn two_concurrent_builds_run_a_shared_step_once() {
    let env = TestEnv::new();
    let df = format!(
        "FROM {}\nRUN sleep 2 && head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n' > /rand\n",
        base()
    );
    let ctx = context(&env, "ctx", &df, &[]);
    let spawn = |n: usize| {
        env.strata()
            .arg("build")
            .arg("--progress=plain")
            .arg("--output")
            .arg(format!(
                "type=local,dest={}",
                env.path(&format!("out{n}")).display()
            ))
            .arg(&ctx)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let children: Vec<std::process::Child> = vec![spawn(1), spawn(2)];
    let logs: Vec<String> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            let log = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(out.status.success(), "{log}");
            log
        })
        .collect();
    let rand1 = std::fs::read_to_string(env.path("out1").join("rand")).unwrap();
    let rand2 = std::fs::read_to_string(env.path("out2").join("rand")).unwrap();
    assert_eq!(rand1.len(), 32, "{rand1:?}");
    assert_eq!(
        rand1, rand2,
        "the shared RUN ran twice:\n{}\n{}",
        logs[0], logs[1]
    );
    let ran: usize = logs
        .iter()
        .map(|l| {
            executed_steps(l)
                .iter()
                .filter(|s| s.contains("RUN sleep 2"))
                .count()
        })
        .sum();
    assert_eq!(ran, 1, "{logs:?}");
    assert!(
        logs.iter()
            .any(|l| cached_steps(l).iter().any(|s| s.contains("RUN sleep 2"))),
        "{logs:?}"
    );
    // And a rebuild sees the same value (the recorded result is the one both used).
    let out3 = env.path("out3");
    env.build_ok(&[
        "--output",
        &format!("type=local,dest={}", out3.display()),
        s(&ctx),
    ]);
    assert_eq!(std::fs::read_to_string(out3.join("rand")).unwrap(), rand1);
}

#[test]
fn tty_progress_collapses_finished_steps_to_one_line_each() {
    let env = TestEnv::new();
    let df = format!("FROM {}\nRUN echo tty-step > /t\n", base());
    let ctx = context(&env, "ctx", &df, &[]);
    let build = || {
        let out = env
            .strata()
            .args(["build", "--progress=tty", s(&ctx)])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        err
    };
    let first = build();
    let done = first
        .lines()
        .find(|l| l.starts_with("=> [stage-0 2/2] RUN echo tty-step > /t  "))
        .unwrap_or_else(|| panic!("no collapsed RUN line:\n{first}"));
    assert!(done.ends_with('s'), "{done}");
    // Plain progress's numbered lines are not mixed in.
    assert!(!first.lines().any(|l| l.starts_with("#2 ")), "{first}");
    let second = build();
    assert!(
        second
            .lines()
            .any(|l| l == "=> CACHED [stage-0 2/2] RUN echo tty-step > /t"),
        "{second}"
    );
}
