//! End-to-end runs of the sandbox over a busybox root (needs root, overlayfs, namespaces).

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use strata_sandbox::{Error, ExtraMount, Network, ProcessSpec, RunRequest, Sandbox, Stream};
use strata_snapshotter::Mount;

const INIT: &str = env!("CARGO_BIN_EXE_sandbox-init");

const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "id", "ls", "mount", "hostname", "ip", "touch", "sleep", "grep", "stat",
    "test", "mkdir", "pwd", "wc", "kill", "true", "false", "env",
];

/// A tiny root: busybox with applet links, /etc/passwd, /etc/group and /tmp.
fn busybox_root(dir: &Path) {
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::copy("/usr/bin/busybox", dir.join("bin/busybox")).unwrap();
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(a)).unwrap();
    }
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .unwrap();
    fs::write(
        dir.join("etc/group"),
        "root:x:0:\napp:x:1000:\nstaff:x:50:app\n",
    )
    .unwrap();
    fs::create_dir_all(dir.join("tmp")).unwrap();
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
}

fn bind_root(dir: &Path) -> Vec<Mount> {
    vec![Mount {
        kind: "bind".into(),
        source: dir.display().to_string(),
        options: vec!["rbind".into(), "rw".into()],
    }]
}

struct Overlay {
    _dir: tempfile::TempDir,
    lower: PathBuf,
    upper: PathBuf,
    base: PathBuf,
}

fn overlay() -> Overlay {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_path_buf();
    for d in ["lower", "upper", "work"] {
        fs::create_dir(base.join(d)).unwrap();
    }
    busybox_root(&base.join("lower"));
    Overlay {
        lower: base.join("lower"),
        upper: base.join("upper"),
        base,
        _dir: dir,
    }
}

impl Overlay {
    /// Relative paths resolved from `chdir=`, as the snapshotter emits them.
    fn mounts(&self) -> Vec<Mount> {
        vec![Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                format!("chdir={}", self.base.display()),
                "lowerdir=lower".into(),
                "upperdir=upper".into(),
                "workdir=work".into(),
            ],
        }]
    }
}

fn request(rootfs: Vec<Mount>, script: &str) -> RunRequest {
    RunRequest {
        rootfs,
        process: ProcessSpec {
            args: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec![],
            cwd: "/".into(),
            user: String::new(),
            hostname: String::new(),
            network: Network::Host,
            privileged: false,
        },
        mounts: vec![],
        hosts_file: None,
        resolv_conf: None,
    }
}

struct Outcome {
    result: Result<(), Error>,
    stdout: String,
    stderr: String,
}

fn run(req: &RunRequest) -> Outcome {
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let result = Sandbox::new(PathBuf::from(INIT)).run(req, &mut |s, d| match s {
        Stream::Stdout => stdout.extend_from_slice(d),
        Stream::Stderr => stderr.extend_from_slice(d),
    });
    Outcome {
        result,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

fn run_ok(req: &RunRequest) -> String {
    let o = run(req);
    if let Err(e) = &o.result {
        panic!(
            "run failed: {e}\nstdout: {}\nstderr: {}",
            o.stdout, o.stderr
        );
    }
    o.stdout
}

fn host_mounts() -> BTreeSet<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .collect()
}

/// Entries the sandbox may have created as mount points must not be left behind.
fn assert_no_stubs(root: &Path) {
    for p in [
        "proc",
        "dev",
        "sys",
        "etc/hosts",
        "etc/resolv.conf",
        "etc/hostname",
    ] {
        assert!(
            fs::symlink_metadata(root.join(p)).is_err(),
            "{p} left in {}",
            root.display()
        );
    }
}

#[test]
fn output_is_streamed_and_exit_code_reported() {
    let dir = tempfile::tempdir().unwrap();
    busybox_root(dir.path());
    let o = run(&request(
        bind_root(dir.path()),
        "echo out; echo err >&2; exit 3",
    ));
    assert_eq!(o.stdout, "out\n");
    assert_eq!(o.stderr, "err\n");
    match o.result {
        Err(Error::Exit { code: 3 }) => {}
        other => panic!("expected exit 3, got {other:?}"),
    }
    let o = run(&request(bind_root(dir.path()), "kill -9 $$"));
    assert!(
        matches!(o.result, Err(Error::Exit { code: 137 })),
        "{:?}",
        o.result
    );
    assert_eq!(
        o.result.unwrap_err().to_string(),
        "process did not complete successfully: exit code: 137"
    );
    assert_no_stubs(dir.path());
}

#[test]
fn isolated_pid_namespace_and_no_host_files() {
    let marker = tempfile::Builder::new()
        .prefix("strata-host-marker")
        .tempfile_in("/tmp")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    busybox_root(dir.path());
    let script = format!(
        "echo $$; ls /proc | grep -E '^[0-9]+$' | wc -l; test -e {} && echo visible || echo absent; \
         cat /proc/1/environ >/dev/null 2>&1 && echo readable || echo hidden",
        marker.path().display()
    );
    let out = run_ok(&request(bind_root(dir.path()), &script));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "2", "the command is the first child of pid 1");
    let procs: usize = lines[1].trim().parse().unwrap();
    assert_eq!(
        lines[3], "hidden",
        "pid 1's environment must not be readable"
    );
    assert!(procs <= 5, "sandbox sees {procs} processes");
    assert_eq!(lines[2], "absent");
    assert_no_stubs(dir.path());
}

#[test]
fn hostname_hosts_and_resolv_conf() {
    let dir = tempfile::tempdir().unwrap();
    busybox_root(dir.path());
    let mut req = request(
        bind_root(dir.path()),
        "hostname; cat /etc/hosts; cat /etc/resolv.conf; echo x >> /etc/hosts || echo ro",
    );
    let out = run_ok(&req);
    assert!(
        out.starts_with("buildkitsandbox\n127.0.0.1\tlocalhost buildkitsandbox\n"),
        "{out}"
    );
    let host_resolv = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    assert!(out.contains(&host_resolv), "{out}");
    assert!(out.ends_with("ro\n"), "hosts must be read-only: {out}");
    req.process.hostname = "myhost".into();
    req.process.args[2] = "hostname; grep myhost /etc/hosts".into();
    let out = run_ok(&req);
    assert_eq!(out, "myhost\n127.0.0.1\tlocalhost myhost\n");
    assert_no_stubs(dir.path());
}

#[test]
fn network_none_has_only_loopback() {
    let dir = tempfile::tempdir().unwrap();
    busybox_root(dir.path());
    let mut req = request(
        bind_root(dir.path()),
        "ls /sys/class/net; cat /proc/net/dev | wc -l",
    );
    req.process.network = Network::None;
    let out = run_ok(&req);
    // Two header lines plus lo.
    assert_eq!(out, "lo\n3\n");
    req.process.network = Network::Host;
    let out = run_ok(&req);
    assert!(
        out.lines().count() > 2,
        "host network shows host interfaces: {out}"
    );
    assert_no_stubs(dir.path());
}

#[test]
fn overlay_user_cwd_and_no_stub_in_upper() {
    let ov = overlay();
    let lower_etc_mtime = fs::metadata(ov.lower.join("etc")).unwrap().mtime();
    let mut req = request(ov.mounts(), "pwd; id; touch file; touch /tmp/t");
    req.process.user = "app".into();
    req.process.cwd = "/work/dir".into();
    let out = run_ok(&req);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "/work/dir");
    assert!(lines[1].starts_with("uid=1000(app) gid=1000(app)"), "{out}");
    assert!(lines[1].contains("50(staff)"), "supplementary group: {out}");
    for p in ["work", "work/dir", "work/dir/file", "tmp/t"] {
        let m = fs::metadata(ov.upper.join(p)).unwrap();
        assert_eq!((m.uid(), m.gid()), (1000, 1000), "{p}");
    }
    assert_no_stubs(&ov.upper);
    // The stubs' parent was copied up; it must look as it did below.
    if let Ok(etc) = fs::read_dir(ov.upper.join("etc")) {
        assert_eq!(etc.count(), 0);
        assert_eq!(
            fs::metadata(ov.upper.join("etc")).unwrap().mtime(),
            lower_etc_mtime
        );
    }
}

#[test]
fn device_nodes_made_in_a_step_cannot_be_opened() {
    // Without a devices cgroup a step keeps CAP_MKNOD (Docker's set); the root and /dev are
    // nodev so its nodes stay inert (here 1:3, /dev/null's numbers, so nothing real is at
    // stake), while the host's own /dev/null is usable.
    let ov = overlay();
    let req = request(
        ov.mounts(),
        "mknod /tmp/n c 1 3 && (echo x > /tmp/n && echo root-open || echo root-denied); \
         mknod /dev/n c 1 3 && (echo x > /dev/n && echo dev-open || echo dev-denied); \
         echo x > /dev/null && echo null-ok",
    );
    assert_eq!(run_ok(&req), "root-denied\ndev-denied\nnull-ok\n");
    // The node itself is kept in the layer, as a build may want it in the image.
    let m = fs::symlink_metadata(ov.upper.join("tmp/n")).unwrap();
    assert!(m.file_type().is_char_device());
    assert_no_stubs(&ov.upper);
}

#[test]
fn capabilities_are_dockers_and_mount_is_denied() {
    let dir = tempfile::tempdir().unwrap();
    busybox_root(dir.path());
    let req = request(
        bind_root(dir.path()),
        "grep -E '^Cap(Eff|Bnd)' /proc/self/status; mkdir -p /mnt; mount -t tmpfs tmpfs /mnt && echo mounted",
    );
    let o = run(&req);
    assert!(o.result.is_err(), "mount must fail");
    assert_eq!(
        o.stdout,
        "CapEff:\t00000000a80425fb\nCapBnd:\t00000000a80425fb\n"
    );
    assert!(
        o.stderr.contains("ermission denied") || o.stderr.contains("not permitted"),
        "{}",
        o.stderr
    );
    let mut req = request(bind_root(dir.path()), "grep CapEff /proc/self/status");
    req.process.user = "1000".into();
    assert_eq!(run_ok(&req), "CapEff:\t0000000000000000\n");
    let _ = fs::remove_dir(dir.path().join("mnt"));
    assert_no_stubs(dir.path());
}

#[test]
fn no_new_privs_is_set_except_for_privileged_steps() {
    let dir = tempfile::tempdir().unwrap();
    busybox_root(dir.path());
    let req = request(bind_root(dir.path()), "grep NoNewPrivs /proc/self/status");
    assert_eq!(run_ok(&req), "NoNewPrivs:\t1\n");
    let mut req = request(bind_root(dir.path()), "grep NoNewPrivs /proc/self/status");
    req.process.privileged = true;
    assert_eq!(run_ok(&req), "NoNewPrivs:\t0\n");
    assert_no_stubs(dir.path());
}

#[test]
fn kernel_files_are_read_only_or_masked() {
    let dir = tempfile::tempdir().unwrap();
    busybox_root(dir.path());
    let req = request(
        bind_root(dir.path()),
        "echo 0 > /proc/sys/vm/overcommit_memory 2>/dev/null && echo wrote-sysctl; \
         echo h > /proc/sysrq-trigger 2>/dev/null && echo wrote-sysrq; \
         wc -c < /proc/timer_list; ls /sys/firmware | wc -l; grep -c ' /proc/sys ro,' /proc/self/mountinfo",
    );
    let out = run_ok(&req);
    assert_eq!(out, "0\n0\n1\n");
}

#[test]
fn setup_failures_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    busybox_root(dir.path());
    let mut req = request(bind_root(dir.path()), "");
    req.process.args = vec!["nonexistent".into()];
    match run(&req).result {
        Err(Error::Setup(m)) => {
            assert_eq!(
                m,
                "exec: \"nonexistent\": executable file not found in $PATH"
            )
        }
        other => panic!("{other:?}"),
    }
    fs::write(dir.path().join("script"), "echo no shebang\n").unwrap();
    fs::set_permissions(dir.path().join("script"), fs::Permissions::from_mode(0o755)).unwrap();
    req.process.args = vec!["/script".into()];
    match run(&req).result {
        Err(Error::Setup(m)) => assert_eq!(m, "exec /script: exec format error"),
        other => panic!("{other:?}"),
    }
    fs::remove_file(dir.path().join("script")).unwrap();
    let mut req = request(bind_root(dir.path()), "true");
    req.process.user = "bob".into();
    match run(&req).result {
        Err(Error::Setup(m)) => {
            assert_eq!(
                m,
                "unable to find user bob: no matching entries in passwd file"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_no_stubs(dir.path());
}

#[test]
fn env_defaults() {
    let dir = tempfile::tempdir().unwrap();
    busybox_root(dir.path());
    let mut req = request(bind_root(dir.path()), "echo $PATH $HOME $FOO");
    req.process.env = vec!["FOO=bar".into()];
    assert_eq!(
        run_ok(&req),
        format!("{} /root bar\n", strata_sandbox::DEFAULT_PATH)
    );
}

#[test]
fn extra_mounts_and_background_processes() {
    let dir = tempfile::tempdir().unwrap();
    busybox_root(dir.path());
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("input"), "hello\n").unwrap();
    let mut req = request(
        bind_root(dir.path()),
        "cat /src/input; touch /src/new 2>/dev/null || echo ro; echo c > /cache/a && cat /cache/a; \
         sleep 100 & echo started",
    );
    req.mounts = vec![
        ExtraMount::Bind {
            source: src.path().to_path_buf(),
            target: "/src".into(),
            readonly: true,
        },
        ExtraMount::Tmpfs {
            target: "/cache/deep".into(),
            size: Some(1 << 20),
        },
    ];
    req.process.args[2] = req.process.args[2].replace("/cache/a", "/cache/deep/a");
    let start = Instant::now();
    let out = run_ok(&req);
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "background sleep must be killed"
    );
    assert_eq!(out, "hello\nro\nc\nstarted\n");
    assert!(!src.path().join("new").exists());
    assert!(!dir.path().join("src").exists());
    assert!(!dir.path().join("cache").exists());
    assert_no_stubs(dir.path());
}

#[test]
fn killed_builder_leaves_no_mounts_or_processes() {
    let before = host_mounts();
    let dir = tempfile::tempdir().unwrap();
    busybox_root(dir.path());
    let out = tempfile::tempdir().unwrap();
    let mut req = request(
        bind_root(dir.path()),
        "touch /out/started; sleep 3; touch /out/survived",
    );
    req.mounts = vec![ExtraMount::Bind {
        source: out.path().to_path_buf(),
        target: "/out".into(),
        readonly: false,
    }];
    let req_file = out.path().join("req.json");
    fs::write(&req_file, serde_json::to_vec(&req).unwrap()).unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut builder = std::process::Command::new(INIT)
        .arg("run")
        .arg(&req_file)
        .env("TMPDIR", state.path())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !out.path().join("started").exists() {
        assert!(Instant::now() < deadline, "step never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let during = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !during.contains(&dir.path().display().to_string()),
        "mounts leaked to host"
    );
    builder.kill().unwrap();
    builder.wait().unwrap();
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        !out.path().join("survived").exists(),
        "step outlived the builder"
    );
    // Only mounts of this test's own directories count: tests running beside it (and
    // other builds on the machine) mount and unmount their own meanwhile.
    let ours = |m: &String| {
        [dir.path(), out.path(), state.path()]
            .iter()
            .any(|d| m.starts_with(&d.display().to_string()))
    };
    let leaked: Vec<String> = host_mounts()
        .difference(&before)
        .filter(|m| ours(m))
        .cloned()
        .collect();
    assert!(leaked.is_empty(), "mounts left behind: {leaked:?}");
}

#[test]
fn host_mount_table_unchanged_after_runs() {
    let state_dirs = || -> BTreeSet<std::ffi::OsString> {
        fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with("strata-sandbox-"))
            .collect()
    };
    let state_before = state_dirs();
    let before = host_mounts();
    let ov = overlay();
    let dir = tempfile::tempdir().unwrap();
    busybox_root(dir.path());
    run_ok(&request(ov.mounts(), "cat /proc/mounts > /dev/null"));
    run_ok(&request(bind_root(dir.path()), "true"));
    let after = host_mounts();
    let new: Vec<_> = after.difference(&before).collect();
    assert!(
        new.iter()
            .all(|m| !m.contains(&ov.base.display().to_string())
                && !m.contains(&dir.path().display().to_string())),
        "new host mounts: {new:?}"
    );
    // Only dirs that appeared during this test count: killed builders elsewhere on the
    // machine may have left theirs, and other tests run concurrently.
    let new_state_dirs = state_dirs().difference(&state_before).count();
    assert!(
        new_state_dirs < 20,
        "{new_state_dirs} state directories left in the temp dir"
    );
}

/// Runs `script` metered and returns its output, the cgroup path the meter read, and the
/// most CPU time the meter ever showed (read every 10 ms while the step runs).
fn run_measured(script: &str) -> (String, Duration, bool) {
    let dir = tempfile::tempdir().unwrap();
    busybox_root(dir.path());
    let meter = std::sync::Mutex::new(None::<strata_sandbox::CpuMeter>);
    let done = std::sync::atomic::AtomicBool::new(false);
    let mut stdout = Vec::new();
    let (result, most) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut most = Duration::ZERO;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some(used) = meter.lock().unwrap().as_ref().and_then(|m| m.usage()) {
                    most = most.max(used);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            most
        });
        let result = Sandbox::new(PathBuf::from(INIT)).run_metered(
            &request(bind_root(dir.path()), script),
            &mut |stream, d| {
                if stream == Stream::Stdout {
                    stdout.extend_from_slice(d)
                }
            },
            &mut |m| *meter.lock().unwrap() = Some(m),
        );
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        (result, reader.join().unwrap())
    });
    result.unwrap();
    // The step's cgroup is removed with the step: its meter reads nothing any more.
    let gone = meter.lock().unwrap().as_ref().unwrap().usage().is_none();
    (String::from_utf8_lossy(&stdout).into_owned(), most, gone)
}

#[test]
fn a_busy_steps_cgroup_shows_cpu_use_and_a_sleeping_ones_does_not() {
    if !strata_sandbox::cpu_metering_available() {
        eprintln!("skipped: no writable cgroup2 hierarchy on this host");
        return;
    }
    // A fixed amount of shell arithmetic (about 0.3 s of CPU here), then a pause so the
    // reader sees the final count before the cgroup goes away.
    let (out, busy, gone) = run_measured(
        "cat /proc/self/cgroup; i=0; while test $i -lt 300000; do i=$((i+1)); done; sleep 0.3",
    );
    // The step's processes are in a cgroup of their own under strata/.
    assert!(
        out.lines().any(|l| l.starts_with("0::/strata/")),
        "cgroup: {out}"
    );
    assert!(gone, "the step's cgroup outlived it");
    let (_, idle, _) = run_measured("sleep 1");
    assert!(
        busy >= Duration::from_millis(100),
        "busy step used {busy:?}"
    );
    assert!(
        idle * 10 < busy,
        "sleeping step used {idle:?}, busy step {busy:?}"
    );
}
