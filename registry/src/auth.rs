//! Credentials (docker's `config.json` and credential helpers) and `WWW-Authenticate`
//! challenges.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;

use crate::reference::DOCKER_HUB;
use crate::Error;

/// The key docker's config uses for Docker Hub.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// One challenge of a `WWW-Authenticate` header: `Bearer realm="...",service="..."`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// Lowercased scheme (`basic`, `bearer`).
    pub scheme: String,
    /// Parameters with lowercased names.
    pub params: BTreeMap<String, String>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

/// Parses a `WWW-Authenticate` value, which may hold several challenges
/// (`Basic realm="a", Bearer realm="b",scope="c"`). Malformed parts are skipped.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let mut s = header;
    loop {
        s = s.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        if s.is_empty() {
            break;
        }
        let end = s
            .find(|c: char| c == '=' || c == ',' || c.is_whitespace())
            .unwrap_or(s.len());
        let token = &s[..end];
        let rest = s[end..].trim_start_matches([' ', '\t']);
        if token.is_empty() {
            // A stray '=' or similar: skip one char so the loop always advances.
            s = &s[s.chars().next().map_or(1, char::len_utf8)..];
            continue;
        }
        if let Some(after_eq) = rest.strip_prefix('=') {
            let after_eq = after_eq.trim_start_matches([' ', '\t']);
            let (value, remaining) = parse_value(after_eq);
            if let Some(ch) = out.last_mut() {
                ch.params.insert(token.to_ascii_lowercase(), value);
            }
            s = remaining;
        } else {
            out.push(Challenge {
                scheme: token.to_ascii_lowercase(),
                params: BTreeMap::new(),
            });
            s = rest;
        }
    }
    out
}

/// Reads a quoted-string (with `\` escapes) or a token; returns it and what follows.
fn parse_value(s: &str) -> (String, &str) {
    if let Some(body) = s.strip_prefix('"') {
        let mut value = String::new();
        let mut chars = body.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, esc)) = chars.next() {
                        value.push(esc);
                    }
                }
                '"' => return (value, &body[i + 1..]),
                c => value.push(c),
            }
        }
        (value, "")
    } else {
        let end = s
            .find(|c: char| c == ',' || c.is_whitespace())
            .unwrap_or(s.len());
        (s[..end].to_string(), &s[end..])
    }
}

/// A user name and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    pub(crate) fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// The directory holding docker's `config.json`: `$DOCKER_CONFIG`, else `~/.docker`.
pub fn docker_config_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".docker"))
}

/// Strips a scheme and path so `https://index.docker.io/v1/` and `docker.io` compare equal.
pub(crate) fn normalise_registry(registry: &str) -> String {
    let r = registry
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = r.split('/').next().unwrap_or(r);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_string()
        }
        h => h.to_string(),
    }
}

/// The key under which docker stores `registry`'s credentials.
fn config_key(registry: &str) -> String {
    let r = normalise_registry(registry);
    if r == DOCKER_HUB {
        DOCKER_HUB_KEY.to_string()
    } else {
        r
    }
}

fn read_config(path: &Path) -> Result<Option<serde_json::Value>, Error> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| Error::Json {
                action: format!("parse docker config {}", path.display()),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io {
            action: format!("read docker config {}", path.display()),
            source,
        }),
    }
}

/// Finds credentials for `registry` in `dir/config.json`: a credential helper configured
/// for it (`credHelpers`, else `credsStore`) wins over `auths`, as in docker.
pub fn lookup_credentials(dir: &Path, registry: &str) -> Result<Option<Credentials>, Error> {
    let path = dir.join("config.json");
    let Some(config) = read_config(&path)? else {
        return Ok(None);
    };
    let wanted = normalise_registry(registry);
    let key = config_key(registry);

    let helper = config
        .get("credHelpers")
        .and_then(|h| h.as_object())
        .and_then(|h| {
            h.iter()
                .find(|(k, _)| normalise_registry(k) == wanted)
                .and_then(|(_, v)| v.as_str())
        })
        .or_else(|| config.get("credsStore").and_then(|s| s.as_str()))
        .filter(|h| !h.is_empty());
    if let Some(helper) = helper {
        if let Some(c) = run_helper(helper, &key)? {
            return Ok(Some(c));
        }
    }

    let Some(auths) = config.get("auths").and_then(|a| a.as_object()) else {
        return Ok(None);
    };
    let entry = auths
        .get(&key)
        .or_else(|| {
            auths
                .iter()
                .find(|(k, _)| normalise_registry(k) == wanted)
                .map(|(_, v)| v)
        })
        .and_then(|e| e.as_object());
    let Some(entry) = entry else {
        return Ok(None);
    };
    if let Some(auth) = entry
        .get("auth")
        .and_then(|a| a.as_str())
        .filter(|a| !a.is_empty())
    {
        let invalid = |why: &str| Error::Invalid {
            action: format!("read credentials for {wanted} from {}", path.display()),
            message: why.to_string(),
        };
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| invalid("auth is not valid base64"))?;
        let decoded = String::from_utf8(decoded).map_err(|_| invalid("auth is not utf-8"))?;
        let (user, pass) = decoded
            .split_once(':')
            .ok_or_else(|| invalid("auth is not user:password"))?;
        return Ok(Some(Credentials {
            username: user.to_string(),
            password: pass.to_string(),
        }));
    }
    let field = |name: &str| entry.get(name).and_then(|v| v.as_str()).map(String::from);
    match (field("username"), field("password")) {
        (Some(username), Some(password)) => Ok(Some(Credentials { username, password })),
        _ => Ok(None),
    }
}

/// Runs `docker-credential-<helper> get`. A helper that is missing or knows no credentials
/// for the server means "no credentials", as in docker.
fn run_helper(helper: &str, server: &str) -> Result<Option<Credentials>, Error> {
    let program = format!("docker-credential-{helper}");
    let child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::Io {
                action: format!("run {program}"),
                source,
            })
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading stdin is judged by its exit status below.
        let _ = stdin.write_all(server.as_bytes());
    }
    let output = child.wait_with_output().map_err(|source| Error::Io {
        action: format!("run {program}"),
        source,
    })?;
    if !output.status.success() {
        return Ok(None);
    }
    #[derive(serde::Deserialize)]
    struct HelperOutput {
        #[serde(rename = "Username", default)]
        username: String,
        #[serde(rename = "Secret", default)]
        secret: String,
    }
    let out: HelperOutput =
        serde_json::from_slice(&output.stdout).map_err(|source| Error::Json {
            action: format!("parse output of {program} get"),
            source,
        })?;
    if out.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credentials {
        username: out.username,
        password: out.secret,
    }))
}

/// Stores `user:pass` for `registry` under `auths` in `dir/config.json`, keeping the rest of
/// the file. Written through a temporary file and rename so a crash never truncates it.
pub fn store_credentials(dir: &Path, registry: &str, user: &str, pass: &str) -> Result<(), Error> {
    let path = dir.join("config.json");
    let mut config = read_config(&path)?.unwrap_or_else(|| serde_json::json!({}));
    let Some(obj) = config.as_object_mut() else {
        return Err(Error::Invalid {
            action: format!("update docker config {}", path.display()),
            message: "not a JSON object".into(),
        });
    };
    let auths = obj.entry("auths").or_insert_with(|| serde_json::json!({}));
    if !auths.is_object() {
        *auths = serde_json::json!({});
    }
    let wanted = normalise_registry(registry);
    if let Some(a) = auths.as_object_mut() {
        a.retain(|k, _| normalise_registry(k) != wanted);
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        a.insert(config_key(registry), serde_json::json!({ "auth": encoded }));
    }
    write_config(dir, &path, &config)
}

/// Removes `registry`'s entries from `auths`; returns whether there were any.
pub fn remove_credentials(dir: &Path, registry: &str) -> Result<bool, Error> {
    let path = dir.join("config.json");
    let Some(mut config) = read_config(&path)? else {
        return Ok(false);
    };
    let wanted = normalise_registry(registry);
    let removed = match config.get_mut("auths").and_then(|a| a.as_object_mut()) {
        Some(auths) => {
            let before = auths.len();
            auths.retain(|k, _| normalise_registry(k) != wanted);
            auths.len() != before
        }
        None => false,
    };
    if removed {
        write_config(dir, &path, &config)?;
    }
    Ok(removed)
}

fn write_config(dir: &Path, path: &Path, config: &serde_json::Value) -> Result<(), Error> {
    let io_err = |source| Error::Io {
        action: format!("write docker config {}", path.display()),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io_err)?;
    let mut bytes = serde_json::to_vec_pretty(config).map_err(|source| Error::Json {
        action: format!("serialise docker config {}", path.display()),
        source,
    })?;
    bytes.push(b'\n');
    let tmp = dir.join(format!(".config.json.{}.tmp", std::process::id()));
    let result = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(c: &Challenge) -> Vec<(&str, &str)> {
        c.params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn parses_bearer() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(
            params(&c[0]),
            vec![
                ("realm", "https://auth.docker.io/token"),
                ("scope", "repository:library/busybox:pull,push"),
                ("service", "registry.docker.io"),
            ]
        );
    }

    #[test]
    fn parses_basic_and_multiple() {
        let c = parse_challenges(r#"Basic realm="strata-testenv""#);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].param("realm"), Some("strata-testenv"));

        let c = parse_challenges(
            r#"Basic realm="a, b", BEARER Realm=http://x/token , service = "s\"q" ,error="invalid_token""#,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].param("realm"), Some("a, b"));
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].param("realm"), Some("http://x/token"));
        assert_eq!(c[1].param("service"), Some("s\"q"));
        assert_eq!(c[1].param("error"), Some("invalid_token"));
    }

    #[test]
    fn malformed_headers_do_not_panic() {
        for h in [
            "",
            "=",
            ",,,",
            "Bearer realm=\"unterminated",
            "Bearer =x",
            "realm=x",
            "Bearer realm=",
            "Négotiate ü=\"ö\\",
            "Bearer realm=\"x\"\"y\"",
        ] {
            let _ = parse_challenges(h);
        }
        assert_eq!(
            parse_challenges("Bearer realm=\"unterminated")[0].param("realm"),
            Some("unterminated")
        );
        assert!(parse_challenges("realm=x").is_empty());
    }

    #[test]
    fn config_round_trip_and_lookup() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let dir = tmp.path().to_path_buf();
        assert_eq!(lookup_credentials(&dir, "127.0.0.1:5001").ok(), Some(None));
        std::fs::write(
            dir.join("config.json"),
            r#"{"auths":{"http://127.0.0.1:5001/":{"auth":"c3RyYXRhOnN0cmF0YS1wYXNz"}},"other":1}"#,
        )
        .ok();
        let c = lookup_credentials(&dir, "127.0.0.1:5001").ok().flatten();
        assert_eq!(
            c,
            Some(Credentials {
                username: "strata".into(),
                password: "strata-pass".into()
            })
        );

        assert!(store_credentials(&dir, "docker.io", "u", "p:w").is_ok());
        let c = lookup_credentials(&dir, "index.docker.io").ok().flatten();
        assert_eq!(c.map(|c| c.password), Some("p:w".to_string()));
        let raw = std::fs::read_to_string(dir.join("config.json")).unwrap_or_default();
        assert!(raw.contains(DOCKER_HUB_KEY), "{raw}");
        assert!(raw.contains("\"other\""), "{raw}");

        assert_eq!(remove_credentials(&dir, "docker.io").ok(), Some(true));
        assert_eq!(remove_credentials(&dir, "docker.io").ok(), Some(false));
        assert_eq!(lookup_credentials(&dir, "docker.io").ok(), Some(None));
        assert!(lookup_credentials(&dir, "127.0.0.1:5001")
            .ok()
            .flatten()
            .is_some());

        std::fs::write(dir.join("config.json"), "{not json").ok();
        assert!(matches!(
            lookup_credentials(&dir, "x"),
            Err(Error::Json { .. })
        ));
        std::fs::write(dir.join("config.json"), r#"{"auths":{"x":{"auth":"!!"}}}"#).ok();
        assert!(matches!(
            lookup_credentials(&dir, "x"),
            Err(Error::Invalid { .. })
        ));
    }
}
