//! A stand-alone sandbox init for this crate's tests, which cannot re-exec `strata`.
//!
//! `sandbox-init __sandbox-init` is the init; `sandbox-init run <request.json>` acts as a
//! builder running one request (so a test can kill a builder mid-step).

use std::io::Write;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some(strata_sandbox::INIT_ARG) => strata_sandbox::init_main(),
        Some("run") => std::process::exit(run(args.get(2))),
        _ => {
            eprintln!(
                "usage: sandbox-init {} | run <request.json>",
                strata_sandbox::INIT_ARG
            );
            std::process::exit(2);
        }
    }
}

fn run(path: Option<&String>) -> i32 {
    let Some(path) = path else {
        eprintln!("run: missing request file");
        return 2;
    };
    let req: strata_sandbox::RunRequest = match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("run: read request {path}: {e}");
            return 2;
        }
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("run: current exe: {e}");
            return 2;
        }
    };
    let sandbox = strata_sandbox::Sandbox::new(exe);
    let result = sandbox.run(&req, &mut |stream, data| {
        let _ = match stream {
            strata_sandbox::Stream::Stdout => std::io::stdout().write_all(data),
            strata_sandbox::Stream::Stderr => std::io::stderr().write_all(data),
        };
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}
