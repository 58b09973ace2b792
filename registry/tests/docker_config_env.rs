//! Credentials found through `$DOCKER_CONFIG` and credential helpers on `$PATH`. The
//! environment is process-wide, so this binary holds exactly one test.

use std::os::unix::fs::PermissionsExt;

use strata_dag::Platform;
use strata_registry::{Client, ClientConfig, Error, Reference};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn resolve(reference: &Reference) -> Result<(), Error> {
    Client::new(ClientConfig::default())
        .resolve(reference, &Platform::default())
        .map(|_| ())
}

#[test]
fn credentials_from_docker_config_env_and_helpers() {
    let registry = env_or("STRATA_TEST_AUTH_REGISTRY", "127.0.0.1:5001");
    let user = env_or("STRATA_TEST_AUTH_USER", "strata");
    let pass = env_or("STRATA_TEST_AUTH_PASS", "strata-pass");
    let reference =
        Reference::parse(&format!("{registry}/busybox:latest")).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = dir.path().join("config.json");
    std::env::set_var("DOCKER_CONFIG", dir.path());

    // Empty config directory: the registry asks and we have nothing.
    assert!(matches!(
        resolve(&reference),
        Err(Error::Unauthorized { .. })
    ));

    // `auths.<host>.auth` = base64(user:pass).
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    std::fs::write(
        &config,
        format!(r#"{{"auths":{{"{registry}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    resolve(&reference).unwrap_or_else(|e| panic!("auths: {e}"));

    // A credential helper named in credHelpers, found on PATH, given the host on stdin.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap_or_else(|e| panic!("{e}"));
    let seen = dir.path().join("helper-stdin");
    let helper = bin.join("docker-credential-strata-test");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 2\ncat > '{}'\nprintf '%s' '{{\"ServerURL\":\"{registry}\",\"Username\":\"{user}\",\"Secret\":\"{pass}\"}}'\n",
            seen.display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("{e}"));
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::set_var("PATH", format!("{}:{path}", bin.display()));
    std::fs::write(
        &config,
        format!(r#"{{"credHelpers":{{"{registry}":"strata-test"}}}}"#),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    resolve(&reference).unwrap_or_else(|e| panic!("credHelpers: {e}"));
    assert_eq!(
        std::fs::read_to_string(&seen).unwrap_or_default(),
        registry,
        "the helper is asked for the registry host"
    );

    // credsStore applies to every registry; a missing helper means no credentials.
    std::fs::write(&config, r#"{"credsStore":"strata-test"}"#).unwrap_or_else(|e| panic!("{e}"));
    resolve(&reference).unwrap_or_else(|e| panic!("credsStore: {e}"));
    std::fs::write(&config, r#"{"credsStore":"strata-no-such-helper"}"#)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        resolve(&reference),
        Err(Error::Unauthorized { .. })
    ));

    // The free login/logout functions write to $DOCKER_CONFIG/config.json.
    std::fs::write(&config, r#"{"credsStore":"","psFormat":"table"}"#)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        strata_registry::login(&registry, &user, "nope"),
        Err(Error::LoginFailed { .. })
    ));
    strata_registry::login(&registry, &user, &pass).unwrap_or_else(|e| panic!("login: {e}"));
    let raw = std::fs::read_to_string(&config).unwrap_or_default();
    assert!(raw.contains(&auth), "{raw}");
    assert!(raw.contains("psFormat"), "other settings are kept: {raw}");
    resolve(&reference).unwrap_or_else(|e| panic!("after login: {e}"));
    assert_eq!(strata_registry::logout(&registry).ok(), Some(true));
    assert!(matches!(
        resolve(&reference),
        Err(Error::Unauthorized { .. })
    ));
}
