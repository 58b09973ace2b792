//! `--secret`, `--ssh` and `--allow` of `strata build`, read as docker buildx reads them.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use strata_solver::runmount::{RunEnv, INSECURE_ENTITLEMENT};

/// What RUN steps get from the client, besides the graph.
pub fn run_env(secrets: &[String], ssh: &[String], allow: &[String]) -> Result<RunEnv> {
    let mut env = RunEnv::default();
    for spec in secrets {
        let (id, data) = parse_secret(spec)?;
        env.secrets.insert(id, data);
    }
    for spec in ssh {
        let (id, sock) = parse_ssh(spec, std::env::var_os("SSH_AUTH_SOCK").map(PathBuf::from))?;
        env.ssh.insert(id, sock);
    }
    for a in allow {
        match a.as_str() {
            INSECURE_ENTITLEMENT => env.allow_insecure = true,
            "network.host" => {}
            other => bail!("invalid entitlement: {other}"),
        }
    }
    Ok(env)
}

/// `id=x[,type=file|env][,src|source=path][,env=VAR]`; with neither source nor env, the
/// environment variable named like the id, as buildx does.
fn parse_secret(spec: &str) -> Result<(String, Vec<u8>)> {
    let mut id = None;
    let mut kind = None;
    let mut src = None;
    let mut var = None;
    for field in spec.split(',') {
        let (k, v) = field
            .split_once('=')
            .ok_or_else(|| anyhow!("invalid field '{field}' must be a key=value pair"))?;
        match k.to_lowercase().as_str() {
            "id" => id = Some(v.to_string()),
            "type" => {
                if v != "file" && v != "env" {
                    bail!("unsupported secret type {v:?}");
                }
                kind = Some(v.to_string())
            }
            "source" | "src" => src = Some(v.to_string()),
            "env" => var = Some(v.to_string()),
            other => bail!("unexpected key '{other}' in '{field}'"),
        }
    }
    if kind.as_deref() == Some("env") && var.is_none() {
        var = src.take();
    }
    let id = id
        .or_else(|| src.clone())
        .or_else(|| var.clone())
        .ok_or_else(|| anyhow!("secret {spec:?}: an id is required"))?;
    if let Some(path) = src {
        let data = std::fs::read(&path).with_context(|| format!("read secret {id} from {path}"))?;
        return Ok((id, data));
    }
    let name = var.unwrap_or_else(|| id.clone());
    let value = std::env::var_os(&name)
        .ok_or_else(|| anyhow!("secret {id}: environment variable {name} is not set"))?;
    Ok((id, value.into_encoded_bytes()))
}

/// `default|<id>[=<socket>]`: an agent socket (keys are not supported).
fn parse_ssh(spec: &str, auth_sock: Option<PathBuf>) -> Result<(String, PathBuf)> {
    let (id, path) = match spec.split_once('=') {
        Some((id, p)) => (id.to_string(), Some(p)),
        None => (spec.to_string(), None),
    };
    if id.is_empty() {
        bail!("invalid ssh spec {spec:?}: empty id");
    }
    let sock = match path {
        Some(p) if p.contains(',') => bail!("ssh {id}: only one agent socket is supported"),
        Some(p) => PathBuf::from(p),
        None => auth_sock
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| {
                anyhow!("invalid empty ssh agent socket: make sure SSH_AUTH_SOCK is set")
            })?,
    };
    let meta = std::fs::metadata(&sock).with_context(|| format!("ssh {id}: {}", sock.display()))?;
    if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
        bail!(
            "ssh {id}: {} is not an agent socket (ssh keys are not supported)",
            sock.display()
        );
    }
    Ok((id, sock))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_from_files_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s");
        std::fs::write(&f, "from-file").unwrap();
        let (id, data) = parse_secret(&format!("id=tok,src={}", f.display())).unwrap();
        assert_eq!((id.as_str(), data.as_slice()), ("tok", &b"from-file"[..]));
        std::env::set_var("STRATA_TEST_SECRET_VAR", "from-env");
        let (id, data) = parse_secret("id=e,env=STRATA_TEST_SECRET_VAR").unwrap();
        assert_eq!((id.as_str(), data.as_slice()), ("e", &b"from-env"[..]));
        assert!(parse_secret("id=x,bogus=1").is_err());
        assert!(parse_secret("id=x,env=STRATA_TEST_SECRET_UNSET")
            .unwrap_err()
            .to_string()
            .contains("is not set"));
    }

    #[test]
    fn ssh_needs_a_socket() {
        assert!(parse_ssh("default", None)
            .unwrap_err()
            .to_string()
            .contains("SSH_AUTH_SOCK"));
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let (id, p) = parse_ssh("default", Some(sock.clone())).unwrap();
        assert_eq!((id.as_str(), p), ("default", sock.clone()));
        let file = dir.path().join("key");
        std::fs::write(&file, "k").unwrap();
        assert!(parse_ssh(&format!("k={}", file.display()), None).is_err());
    }
}
