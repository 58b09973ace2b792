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
    // Die quietly on a closed pipe (`strata du | head`), like other Unix tools, instead of
    // panicking in println!.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    std::process::exit(strata::run());
}
