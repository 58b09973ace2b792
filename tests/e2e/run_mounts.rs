//! RUN --mount (cache, bind, tmpfs, secret, ssh), --network, --security and the sandbox's
//! isolation, on the busybox base.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

fn context(env: &TestEnv, name: &str, dockerfile: &str) -> PathBuf {
    let dir = env.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        dockerfile.replace("BASE", &format!("{}/busybox:latest", registry())),
    )
    .unwrap();
    dir
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name))
        .unwrap_or_else(|e| panic!("{}/{name}: {e}", dir.display()))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn cache_mount_persists_across_builds_and_no_cache_and_stays_out_of_the_image() {
    let env = TestEnv::new();
    let ctx = context(
        &env,
        "ctx",
        "FROM BASE\nARG N\n\
         RUN --mount=type=cache,target=/var/cache/app,uid=1000,mode=0750 \
         sh -c 'echo $N >> /var/cache/app/log && cat /var/cache/app/log > /seen && \
         stat -c %u:%a /var/cache/app > /owner'\n",
    );
    let out = |n: &str| env.path(&format!("out{n}"));
    env.build_ok(&[
        "--build-arg",
        "N=1",
        "--output",
        &format!("type=local,dest={}", s(&out("1"))),
        s(&ctx),
    ]);
    assert_eq!(read(&out("1"), "seen"), "1\n");
    assert_eq!(read(&out("1"), "owner"), "1000:750\n");
    env.build_ok(&[
        "--build-arg",
        "N=2",
        "--output",
        &format!("type=local,dest={}", s(&out("2"))),
        s(&ctx),
    ]);
    assert_eq!(read(&out("2"), "seen"), "1\n2\n");
    let third = env.build_ok(&[
        "--no-cache",
        "--build-arg",
        "N=2",
        "--output",
        &format!("type=local,dest={}", s(&out("3"))),
        s(&ctx),
    ]);
    assert!(
        executed_steps(&third).iter().any(|x| x.contains("RUN")),
        "{third}"
    );
    assert_eq!(read(&out("3"), "seen"), "1\n2\n2\n");
    // Neither the cache's content nor its mount point is in the result.
    for o in ["1", "2", "3"] {
        assert!(!out(o).join("var/cache").exists(), "{o}");
    }
}

#[test]
fn locked_cache_mount_serializes_concurrent_builds() {
    let env = TestEnv::new();
    let df = |name: &str| {
        format!(
            "FROM BASE\nRUN --mount=type=cache,id=shared-lock,target=/c,sharing=locked \
             sh -c 'echo start-{name} >> /c/log; sleep 2; echo end-{name} >> /c/log; \
             cp /c/log /log'\n"
        )
    };
    let a = context(&env, "a", &df("a"));
    let b = context(&env, "b", &df("b"));
    // Pull the base first so both steps start together.
    let warm = context(&env, "warm", "FROM BASE\nRUN true\n");
    env.build_ok(&[s(&warm)]);
    let spawn = |ctx: &Path, out: &str| {
        env.strata()
            .arg("build")
            .arg("--progress=plain")
            .arg("--output")
            .arg(format!("type=local,dest={}", s(&env.path(out))))
            .arg(ctx)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let started = std::time::Instant::now();
    let ca = spawn(&a, "out-a");
    let cb = spawn(&b, "out-b");
    for c in [ca, cb] {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let elapsed = started.elapsed();
    let la = read(&env.path("out-a"), "log");
    let lb = read(&env.path("out-b"), "log");
    let last = if la.lines().count() > lb.lines().count() {
        la
    } else {
        lb
    };
    let lines: Vec<&str> = last.lines().collect();
    assert_eq!(lines.len(), 4, "{last}");
    // Each user ran alone: start and end of one, then the other.
    let first = lines[0].strip_prefix("start-").unwrap();
    let second = lines[2].strip_prefix("start-").unwrap();
    assert_ne!(first, second, "{last}");
    assert_eq!(lines[1], format!("end-{first}"), "{last}");
    assert_eq!(lines[3], format!("end-{second}"), "{last}");
    assert!(elapsed.as_secs_f64() >= 4.0, "{elapsed:?}");
}

#[test]
fn bind_mounts_from_stage_and_context_are_readonly_or_discard_writes() {
    let env = TestEnv::new();
    let ctx = context(
        &env,
        "ctx",
        "FROM BASE AS tools\nRUN mkdir /out && echo built > /out/tool\n\
         FROM BASE\n\
         RUN --mount=from=tools,source=/out,target=/t \
         sh -c 'cat /t/tool > /from-stage; touch /t/new 2>/dev/null && echo yes > /stage-ro-write || echo no > /stage-ro-write'\n\
         RUN --mount=from=tools,source=/out,target=/t,rw \
         sh -c 'echo scribble > /t/new && cat /t/new > /stage-rw-write'\n\
         RUN --mount=from=tools,source=/out,target=/t \
         sh -c 'test -e /t/new && echo leaked > /stage-rw-leak || echo clean > /stage-rw-leak'\n\
         RUN --mount=source=data,target=/d \
         sh -c 'cat /d/in.txt > /from-ctx; touch /d/x 2>/dev/null && echo yes > /ctx-ro-write || echo no > /ctx-ro-write'\n\
         RUN --mount=source=data,target=/d,rw sh -c 'echo scribble > /d/in.txt && cat /d/in.txt > /ctx-rw-write'\n\
         RUN --mount=target=/all sh -c 'test -e /all/data/hidden.txt && echo visible > /ignored || echo absent > /ignored'\n\
         RUN --mount=type=cache,id=seeded,target=/s,from=tools,source=/out cat /s/tool > /seeded\n",
    );
    std::fs::write(ctx.join(".dockerignore"), "data/hidden.txt\n").unwrap();
    std::fs::create_dir(ctx.join("data")).unwrap();
    std::fs::write(ctx.join("data/in.txt"), "from context\n").unwrap();
    std::fs::write(ctx.join("data/hidden.txt"), "ignored\n").unwrap();
    let out = env.path("out");
    env.build_ok(&["--output", &format!("type=local,dest={}", s(&out)), s(&ctx)]);
    assert_eq!(read(&out, "from-stage"), "built\n");
    assert_eq!(read(&out, "stage-ro-write"), "no\n");
    assert_eq!(read(&out, "stage-rw-write"), "scribble\n");
    assert_eq!(read(&out, "stage-rw-leak"), "clean\n");
    assert_eq!(read(&out, "from-ctx"), "from context\n");
    assert_eq!(read(&out, "ctx-ro-write"), "no\n");
    assert_eq!(read(&out, "ctx-rw-write"), "scribble\n");
    // .dockerignore'd files are not part of the context a step sees.
    assert_eq!(read(&out, "ignored"), "absent\n");
    // A cache mount with `from` starts as a copy of that source.
    assert_eq!(read(&out, "seeded"), "built\n");
    // Writes were discarded: the client's file is untouched, no mount point is left.
    assert_eq!(read(&ctx, "data/in.txt"), "from context\n");
    assert!(!out.join("t").exists() && !out.join("d").exists());

    // A changed context file under the bind source reruns the steps that mount it.
    std::fs::write(ctx.join("data/in.txt"), "changed\n").unwrap();
    let again = env.build_ok(&["--output", &format!("type=local,dest={}", s(&out)), s(&ctx)]);
    assert!(
        executed_steps(&again)
            .iter()
            .any(|x| x.contains("source=data,target=/d ")),
        "{again}"
    );
    assert_eq!(read(&out, "from-ctx"), "changed\n");
}

#[test]
fn tmpfs_mount_is_a_tmpfs_and_leaves_nothing() {
    let env = TestEnv::new();
    let ctx = context(
        &env,
        "ctx",
        "FROM BASE\nRUN --mount=type=tmpfs,target=/scratch,size=2m \
         sh -c 'grep \" /scratch \" /proc/mounts > /mnt-line; echo x > /scratch/f'\n",
    );
    let out = env.path("out");
    env.build_ok(&["--output", &format!("type=local,dest={}", s(&out)), s(&ctx)]);
    let line = read(&out, "mnt-line");
    assert!(line.starts_with("tmpfs /scratch tmpfs"), "{line}");
    assert!(line.contains("size=2048k"), "{line}");
    assert!(!out.join("scratch").exists());
}

/// Every byte of an OCI archive: the tar itself and each blob, decompressed when gzip.
fn archive_bytes(env: &TestEnv, tar: &Path) -> Vec<Vec<u8>> {
    let dir = env.path("unpacked-archive");
    std::fs::create_dir_all(&dir).unwrap();
    run_ok(Command::new("tar").arg("-xf").arg(tar).arg("-C").arg(&dir));
    let mut all = vec![std::fs::read(tar).unwrap()];
    let blobs = dir.join("blobs/sha256");
    for entry in std::fs::read_dir(&blobs).unwrap() {
        let p = entry.unwrap().path();
        let raw = std::fs::read(&p).unwrap();
        if raw.starts_with(&[0x1f, 0x8b]) {
            all.push(run_ok(Command::new("gzip").arg("-dc").arg(&p)).stdout);
        }
        all.push(raw);
    }
    all
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Files under `dir` whose content contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() {
                if let Ok(b) = std::fs::read(&p) {
                    if contains(&b, needle) {
                        found.push(p);
                    }
                }
            }
        }
    }
    found
}

#[test]
fn secrets_are_readable_in_the_step_and_nowhere_else() {
    let env = TestEnv::new();
    let value = format!("s3cret-{}", unique());
    let env_value = format!("envs3cret-{}", unique());
    let secret_file = env.path("secret.txt");
    std::fs::write(&secret_file, &value).unwrap();
    let ctx = context(
        &env,
        "ctx",
        "FROM BASE\n\
         RUN --mount=type=secret,id=tok,required \
         sh -c 'sha256sum /run/secrets/tok | cut -c1-64 > /file-sha; stat -c %a:%u /run/secrets/tok > /file-mode'\n\
         RUN --mount=type=secret,id=tok,target=/etc/app/token,mode=0440,uid=1000 \
         sh -c 'stat -c %a:%u /etc/app/token > /custom-mode'\n\
         RUN --mount=type=secret,id=envtok,env=TOKEN sh -c 'printf %s \"$TOKEN\" | sha256sum | cut -c1-64 > /env-sha'\n\
         RUN --mount=type=secret,id=absent sh -c 'test -e /run/secrets/absent && echo present > /absent || echo skipped > /absent'\n",
    );
    let tar = env.path("img.tar");
    let build = |extra: &[&str]| {
        let mut args = vec![
            "--secret".to_string(),
            format!("id=tok,src={}", s(&secret_file)),
            "--secret".into(),
            "id=envtok,env=STRATA_E2E_SECRET".into(),
            "--output".into(),
            format!("type=oci,dest={}", s(&tar)),
        ];
        args.extend(extra.iter().map(|x| x.to_string()));
        args.push(s(&ctx).to_string());
        let out = env
            .strata()
            .arg("build")
            .arg("--progress=plain")
            .args(&args)
            .env("STRATA_E2E_SECRET", &env_value)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        err
    };
    let first = build(&[]);
    let rootfs = env.unpack_oci_archive(&tar, "img");
    let sha = |v: &str| {
        let out = run_ok(
            Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s '{v}' | sha256sum | cut -c1-64")),
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(read(&rootfs, "file-sha"), sha(&value));
    assert_eq!(read(&rootfs, "file-mode"), "400:0\n");
    assert_eq!(read(&rootfs, "custom-mode"), "440:1000\n");
    assert_eq!(read(&rootfs, "env-sha"), sha(&env_value));
    assert_eq!(read(&rootfs, "absent"), "skipped\n");
    // No trace of the values or the mount points in the image.
    for blob in archive_bytes(&env, &tar) {
        assert!(!contains(&blob, value.as_bytes()), "secret in the archive");
        assert!(
            !contains(&blob, env_value.as_bytes()),
            "env secret in the archive"
        );
    }
    assert!(
        !rootfs.join("run").exists(),
        "/run/secrets stub left in the image"
    );
    assert!(
        !rootfs.join("etc/app").exists(),
        "secret target stub left in the image"
    );
    let config = env.oci_archive_config(&tar).to_string();
    assert!(!config.contains(&value) && !config.contains(&env_value));
    assert!(!first.contains(&value) && !first.contains(&env_value));
    // Nor in the store: cache records, snapshots, stat cache.
    assert_eq!(
        files_containing(&env.root(), value.as_bytes()),
        Vec::<PathBuf>::new()
    );
    assert_eq!(
        files_containing(&env.root(), env_value.as_bytes()),
        Vec::<PathBuf>::new()
    );

    // The secret's content is not part of any cache key: a new value changes nothing.
    std::fs::write(&secret_file, "another value").unwrap();
    let second = build(&[]);
    assert_eq!(executed_steps(&second), Vec::<String>::new(), "{second}");

    // A required secret that was not given fails the step.
    let missing = context(
        &env,
        "missing",
        "FROM BASE\nRUN --mount=type=secret,id=nope,required true\n",
    );
    let out = env.build(&[s(&missing)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("secret nope: not found"), "{err}");
}

#[test]
fn ssh_mount_forwards_the_agent_socket() {
    let env = TestEnv::new();
    let sock = env.path("agent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let ctx = context(
        &env,
        "ctx",
        "FROM BASE\nRUN --mount=type=ssh,required \
         sh -c 'test -S \"$SSH_AUTH_SOCK\" && echo \"$SSH_AUTH_SOCK\" > /sock'\n",
    );
    let out = env.path("out");
    env.build_ok(&[
        "--ssh",
        &format!("default={}", s(&sock)),
        "--output",
        &format!("type=local,dest={}", s(&out)),
        s(&ctx),
    ]);
    assert_eq!(read(&out, "sock"), "/run/buildkit/ssh_agent.0\n");
    assert!(!out.join("run").exists());

    // Without the agent (and without the cached result) the required mount fails.
    let other = env.path("other");
    let failed = env.build(&[
        "--no-cache",
        "--output",
        &format!("type=local,dest={}", s(&other)),
        s(&ctx),
    ]);
    assert_eq!(failed.status.code(), Some(1));
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(
        err.contains("no SSH key \"default\" forwarded from the client"),
        "{err}"
    );
}

#[test]
fn network_none_has_only_loopback() {
    let env = TestEnv::new();
    let ctx = context(
        &env,
        "ctx",
        "FROM BASE\nRUN --network=none sh -c 'ls /sys/class/net > /ifaces; tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d \" \" > /devs'\n\
         RUN sh -c 'tail -n +3 /proc/net/dev | wc -l > /host-devs'\n",
    );
    let out = env.path("out");
    env.build_ok(&["--output", &format!("type=local,dest={}", s(&out)), s(&ctx)]);
    assert_eq!(read(&out, "ifaces"), "lo\n");
    assert_eq!(read(&out, "devs"), "lo\n");
    // The default (host) network sees more than loopback on this machine.
    let host: usize = read(&out, "host-devs").trim().parse().unwrap();
    assert!(host > 1, "{host}");
}

#[test]
fn insecure_needs_the_entitlement_and_then_has_all_capabilities() {
    let env = TestEnv::new();
    let ctx = context(
        &env,
        "ctx",
        "FROM BASE\nRUN echo before > /before\n\
         RUN --security=insecure sh -c 'grep CapEff /proc/self/status > /caps; mkdir /m; mount -t tmpfs none /m && echo mounted > /mounted; umount /m'\n",
    );
    let out = env.path("out");
    let denied = env.build(&["--output", &format!("type=local,dest={}", s(&out)), s(&ctx)]);
    assert_eq!(denied.status.code(), Some(1));
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(
        err.contains("entitlement security.insecure is not allowed"),
        "{err}"
    );
    // Refused before anything ran.
    assert!(executed_steps(&err).is_empty(), "{err}");
    assert!(!out.exists());

    env.build_ok(&[
        "--allow",
        "security.insecure",
        "--output",
        &format!("type=local,dest={}", s(&out)),
        s(&ctx),
    ]);
    assert_eq!(read(&out, "mounted"), "mounted\n");
    let caps = read(&out, "caps");
    let mask = u64::from_str_radix(caps.trim().trim_start_matches("CapEff:").trim(), 16).unwrap();
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    assert!(mask & CAP_SYS_ADMIN != 0, "{caps}");
}

#[test]
fn user_by_id_and_name_own_what_they_write() {
    let env = TestEnv::new();
    // busybox has no adduser; a passwd/group entry is what USER resolves against.
    let ctx = context(
        &env,
        "ctx",
        "FROM BASE\n\
         RUN echo 'builder:x:1234:1234::/home/builder:/bin/sh' >> /etc/passwd && \
         echo 'builder:x:1234:' >> /etc/group && mkdir -p /home/builder && \
         chown 1234:1234 /home/builder\n\
         USER 1000\nRUN touch /tmp/by-id && id -u > /tmp/id-1000\n\
         USER builder\nRUN touch /home/builder/by-name && id -un > /home/builder/whoami\n",
    );
    let tar = env.path("img.tar");
    env.build_ok(&["--output", &format!("type=oci,dest={}", s(&tar)), s(&ctx)]);
    let rootfs = env.unpack_oci_archive(&tar, "img");
    let by_id = std::fs::metadata(rootfs.join("tmp/by-id")).unwrap();
    // uid 1000 is busybox's `app`, whose group is 1000.
    assert_eq!((by_id.uid(), by_id.gid()), (1000, 1000));
    assert_eq!(read(&rootfs, "tmp/id-1000"), "1000\n");
    let by_name = std::fs::metadata(rootfs.join("home/builder/by-name")).unwrap();
    assert_eq!((by_name.uid(), by_name.gid()), (1234, 1234));
    assert_eq!(read(&rootfs, "home/builder/whoami"), "builder\n");
}

#[test]
fn sandbox_hides_the_host_and_cannot_mount() {
    let env = TestEnv::new();
    let marker = format!("/tmp/strata-host-marker-{}", unique());
    std::fs::write(&marker, "host").unwrap();
    let ctx = context(
        &env,
        "ctx",
        &format!(
            "FROM BASE\nRUN sh -c 'test -e {marker} && echo visible > /marker || echo hidden > /marker; \
             echo $$ > /pid; ls /proc | grep -c \"^[0-9]\" > /procs; \
             mkdir /m; mount -t tmpfs none /m 2>/dev/null && echo mounted > /mount || echo denied > /mount; \
             rmdir /m'\n"
        ),
    );
    let out = env.path("out");
    env.build_ok(&["--output", &format!("type=local,dest={}", s(&out)), s(&ctx)]);
    let _ = std::fs::remove_file(&marker);
    assert_eq!(read(&out, "marker"), "hidden\n");
    let pid: u32 = read(&out, "pid").trim().parse().unwrap();
    assert!(pid < 10, "step pid {pid} is not in its own pid namespace");
    let procs: u32 = read(&out, "procs").trim().parse().unwrap();
    assert!(procs < 10, "{procs} processes visible");
    assert_eq!(read(&out, "mount"), "denied\n");
}

#[test]
fn a_killed_build_leaves_no_secret_behind_once_the_store_is_used_again() {
    let env = TestEnv::new();
    let secret_file = env.path("secret.txt");
    std::fs::write(&secret_file, format!("killed-{}", unique())).unwrap();
    let ctx = context(
        &env,
        "ctx",
        "FROM BASE\nRUN --mount=type=secret,id=tok,required sh -c 'echo started; sleep 60'\n",
    );
    let mut child = env
        .strata()
        .arg("build")
        .arg("--progress=plain")
        .arg("--secret")
        .arg(format!("id=tok,src={}", s(&secret_file)))
        .arg(&ctx)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let prefix = format!("strata-secret-{}-", child.id());
    let secret_dirs = || -> Vec<PathBuf> {
        ["/dev/shm", "/run"]
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while secret_dirs().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the step never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Give the sandbox time to start, then kill the builder without a chance to clean up.
    std::thread::sleep(std::time::Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    let left = secret_dirs();
    assert!(
        !left.is_empty(),
        "SIGKILL cannot have removed the secret dir"
    );

    // The next build with this store removes it (and leaves no mounts).
    let other = context(&env, "other", "FROM BASE\nRUN true\n");
    env.build_ok(&[s(&other)]);
    for d in &left {
        assert!(!d.exists(), "{} survived", d.display());
    }
    assert_eq!(mounts_under(&env.root()), Vec::<String>::new());
}
