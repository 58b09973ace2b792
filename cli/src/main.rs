fn main() {
    if std::env::args().nth(1).as_deref() == Some(strata_sandbox::INIT_ARG) {
        strata_sandbox::init_main();
    }
}
