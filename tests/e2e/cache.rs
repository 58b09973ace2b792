//! A rebuild reuses every step; a changed context file re-runs only what reads it.

use crate::common::*;

#[test]
fn rebuild_runs_nothing_and_a_changed_file_reruns_only_from_its_copy() {
    let env = TestEnv::new();
    let ctx = env.copy_context(&shared_dir().join("bench/cases/hello"), "hello");
    let ctx_s = ctx.to_str().unwrap();

    let first = env.build_ok(&["-t", "cache:1", ctx_s]);
    let ran = executed_steps(&first);
    assert!(ran.iter().any(|s| s.contains("RUN echo")), "{ran:?}");
    assert!(
        ran.iter().any(|s| s.contains("COPY greeting.txt")),
        "{ran:?}"
    );

    let inspect = || {
        let out = run_ok(env.strata().args(["inspect", "cache:1"]));
        String::from_utf8(out.stdout).unwrap()
    };
    let first_config = inspect();
    // Config times have a resolution of seconds: make sure a time stamped by the rebuild
    // would differ.
    std::thread::sleep(std::time::Duration::from_millis(1100));

    let second = env.build_ok(&["-t", "cache:1", ctx_s]);
    assert_eq!(
        executed_steps(&second),
        Vec::<String>::new(),
        "a rebuild executed steps"
    );
    assert!(!cached_steps(&second).is_empty(), "{second}");
    // As in BuildKit, history and `created` carry the times the layers were made, so the
    // cached rebuild is the very same image.
    assert_eq!(
        inspect(),
        first_config,
        "a cached rebuild made a new config"
    );

    // A touch changes no content: still all cached.
    let f = ctx.join("greeting.txt");
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let touched = env.build_ok(&["-t", "cache:1", ctx_s]);
    assert_eq!(executed_steps(&touched), Vec::<String>::new());

    std::fs::write(&f, "changed greeting\n").unwrap();
    let third = env.build_ok(&["-t", "cache:1", ctx_s]);
    let ran = executed_steps(&third);
    assert_eq!(ran.len(), 1, "{ran:?}");
    assert!(ran[0].contains("COPY greeting.txt"), "{ran:?}");
    assert!(cached_steps(&third).iter().any(|s| s.contains("RUN echo")));

    // --no-cache runs everything again.
    let fourth = env.build_ok(&["--no-cache", "-t", "cache:1", ctx_s]);
    assert_eq!(executed_steps(&fourth).len(), 2, "{fourth}");
    assert_ne!(inspect(), first_config, "re-made layers have new times");
}
