//! A build produces images that independent tools read back: umoci/skopeo for OCI
//! archives, skopeo for the registry, chroot for running the CMD.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use crate::common::*;

#[test]
fn hello_case_unpacks_with_umoci_and_its_cmd_runs() {
    let env = TestEnv::new();
    let ctx = env.copy_context(&shared_dir().join("bench/cases/hello"), "hello");
    let tar = env.path("hello.tar");
    env.build_ok(&[
        "-t",
        "hello:e2e",
        "--output",
        &format!("type=oci,dest={}", tar.display()),
        ctx.to_str().unwrap(),
    ]);

    let config = env.oci_archive_config(&tar);
    assert_eq!(
        config["config"]["Cmd"],
        serde_json::json!(["cat", "/hello.txt", "/greeting.txt"])
    );
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    // busybox's layer plus one for the RUN and one for the COPY
    assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 3);

    let rootfs = env.unpack_oci_archive(&tar, "hello");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("hello.txt")).unwrap(),
        "hello from the strata bench\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("greeting.txt")).unwrap(),
        "greetings, builder\n"
    );
    assert!(rootfs.join("bin/busybox").is_file());
    // The sandbox's mount points must not leak into the layers.
    assert!(
        !rootfs.join("etc/hosts").exists(),
        "/etc/hosts leaked into the image"
    );
    assert!(
        !rootfs.join("etc/resolv.conf").exists(),
        "/etc/resolv.conf leaked into the image"
    );

    let cmd: Vec<String> = serde_json::from_value(config["config"]["Cmd"].clone()).unwrap();
    let out = run_ok(Command::new("chroot").arg(&rootfs).args(&cmd));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the strata bench\ngreetings, builder\n"
    );
}

#[test]
fn two_stage_build_pushes_a_config_skopeo_reads_and_files_have_their_modes() {
    let env = TestEnv::new();
    let ctx = env.copy_context(&repo_dir().join("testdata/two-stage"), "two-stage");
    let name = format!("{}/strata-e2e/two-stage:{}", registry(), unique());
    let tar = env.path("two.tar");
    env.build_ok(&[
        "-t",
        &name,
        "--push",
        "--output",
        &format!("type=oci,dest={}", tar.display()),
        ctx.to_str().unwrap(),
    ]);

    let out = run_ok(
        Command::new("skopeo")
            .args(["inspect", "--tls-verify=false", "--config"])
            .arg(format!("docker://{name}")),
    );
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let c = &config["config"];
    assert_eq!(c["Cmd"], serde_json::json!(["/app/run.sh"]));
    assert_eq!(c["Entrypoint"], serde_json::json!(["/bin/sh"]));
    assert_eq!(c["WorkingDir"], "/app");
    assert_eq!(c["User"], "app");
    assert_eq!(c["Labels"]["org.example.name"], "two-stage");
    assert_eq!(c["Labels"]["org.example.version"], "1");
    assert_eq!(
        c["ExposedPorts"],
        serde_json::json!({"8080/tcp": {}, "9000/tcp": {}})
    );
    let env_list: Vec<String> = serde_json::from_value(c["Env"].clone()).unwrap();
    assert!(
        env_list.iter().any(|e| e.starts_with("PATH=")),
        "{env_list:?}"
    );
    assert!(
        env_list.contains(&"APP_HOME=/app".to_string()),
        "{env_list:?}"
    );
    assert!(
        env_list.contains(&"MODE=production".to_string()),
        "{env_list:?}"
    );
    // ARGs of the builder stage never reach the final config
    assert!(
        !env_list.iter().any(|e| e.starts_with("GREETING")),
        "{env_list:?}"
    );
    assert!(config["history"].as_array().unwrap().len() >= 10);

    let rootfs = env.unpack_oci_archive(&tar, "two");
    let built = rootfs.join("app/built.txt");
    assert_eq!(
        std::fs::read_to_string(&built).unwrap(),
        "hello from the builder\nmessage from the context\n"
    );
    assert_eq!(
        std::fs::metadata(&built).unwrap().permissions().mode() & 0o7777,
        0o640
    );
    let run_sh = std::fs::metadata(rootfs.join("app/run.sh")).unwrap();
    assert_eq!(
        (
            run_sh.uid(),
            run_sh.gid(),
            run_sh.permissions().mode() & 0o7777
        ),
        (1000, 1000, 0o755)
    );
    let data = std::fs::metadata(rootfs.join("app/data")).unwrap();
    assert_eq!((data.uid(), data.gid()), (1000, 1000));
    assert!(!rootfs.join("app/ignored.txt").exists());

    // The entrypoint + cmd run in the unpacked root, with the image's env.
    let out = run_ok(
        Command::new("chroot")
            .arg(&rootfs)
            .args(["/bin/sh", "/app/run.sh"])
            .env("MODE", "production"),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "two-stage says: hello from the builder in production\n"
    );
}

#[test]
fn local_output_and_image_store_commands() {
    let env = TestEnv::new();
    let ctx = env.copy_context(&shared_dir().join("bench/cases/hello"), "hello");
    let dest = env.path("out");
    env.build_ok(&[
        "-t",
        "strata-e2e/local:v1",
        "--output",
        &format!("type=local,dest={}", dest.display()),
        "--load",
        ctx.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_to_string(dest.join("greeting.txt")).unwrap(),
        "greetings, builder\n"
    );
    assert!(std::fs::symlink_metadata(dest.join("bin/sh"))
        .unwrap()
        .file_type()
        .is_symlink());

    let out = run_ok(env.strata().arg("images"));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.starts_with("NAME"), "{listing}");
    let line = listing
        .lines()
        .find(|l| l.starts_with("strata-e2e/local"))
        .unwrap_or_else(|| panic!("{listing}"));
    assert!(line.contains("v1"), "{line}");

    run_ok(env.strata().args(["rmi", "strata-e2e/local:v1"]));
    let out = run_ok(env.strata().arg("images"));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("strata-e2e/local"));
    let out = env
        .strata()
        .args(["rmi", "strata-e2e/local:v1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
