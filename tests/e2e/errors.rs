//! Bad input gets a clear error naming the file, the line and what is wrong.

use crate::common::*;

fn context_with(env: &TestEnv, dockerfile: &str) -> std::path::PathBuf {
    let dir = env.path("ctx");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    dir
}

#[test]
fn failing_run_reports_command_and_exit_code() {
    let env = TestEnv::new();
    let ctx = context_with(
        &env,
        &format!(
            "FROM {}/busybox:latest\nRUN echo before && exit 3\n",
            registry()
        ),
    );
    let out = env.build(&[ctx.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("echo before && exit 3"), "{err}");
    assert!(err.contains("exit code: 3"), "{err}");
    assert!(err.contains("Dockerfile:2"), "{err}");
}

#[test]
fn unknown_instruction_names_it_and_its_line() {
    let env = TestEnv::new();
    let ctx = context_with(&env, "FROM scratch\n\nFROOB bar\n");
    let out = env.build(&[ctx.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.to_lowercase().contains("unknown instruction: froob"),
        "{err}"
    );
    assert!(err.contains("Dockerfile:3"), "{err}");
}

#[test]
fn unsupported_output_type_is_named() {
    let env = TestEnv::new();
    let ctx = context_with(&env, "FROM scratch\n");
    let out = env.build(&[
        "--output",
        "type=cacheonly,dest=/tmp/x.tar",
        ctx.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"cacheonly\""), "{err}");
}

#[test]
fn missing_copy_source_fails_with_its_path() {
    let env = TestEnv::new();
    let ctx = context_with(
        &env,
        &format!("FROM {}/busybox:latest\nCOPY missing.txt /\n", registry()),
    );
    let out = env.build(&[ctx.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"/missing.txt\"") && err.contains("not found"),
        "{err}"
    );
}
