//! The `strata` binary: a tiny main that dispatches to [`strata::run`].

fn main() {
    // The sandbox re-executes this binary as its init; that must happen before anything else
    // (no threads, no argument parsing).
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == strata_sandbox::INIT_ARG)
    {
        strata_sandbox::init_main();
    }
    std::process::exit(strata::run());
}
