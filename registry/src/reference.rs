//! Image reference parsing with docker's normalisation rules.

use strata_dag::Digest;

use crate::{Error, Reference};

/// The registry name docker uses for Docker Hub references.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that actually serves Docker Hub's distribution API.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

impl Reference {
    /// Parses `[registry/]repository[:tag][@digest]`. A first path component is a registry
    /// when it contains `.` or `:`, is `localhost`, or has uppercase letters (docker's rule);
    /// otherwise the registry is `docker.io` and one-component names get `library/`. With
    /// neither tag nor digest the tag is `latest`.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let invalid = |why: &str| Error::InvalidReference(format!("{s}: {why}"));
        if s.is_empty() {
            return Err(invalid("empty reference"));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid("contains whitespace"));
        }

        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => {
                let digest = Digest::parse(d).ok_or_else(|| {
                    invalid("digest must be sha256: followed by 64 lowercase hex digits")
                })?;
                (n, Some(digest))
            }
            None => (s, None),
        };

        // A ':' after the last '/' separates the tag; one before it belongs to a port.
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&name_tag[..at], Some(&name_tag[at + 1..]))
            }
            None => (name_tag, None),
        };
        if let Some(t) = tag {
            if !valid_tag(t) {
                return Err(invalid("invalid tag"));
            }
        }

        let (mut registry, mut repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        if registry == "index.docker.io" {
            registry = DOCKER_HUB.to_string();
        }
        if !valid_registry(&registry) {
            return Err(invalid("invalid registry host"));
        }
        if registry == DOCKER_HUB && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        if repository.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(invalid("repository name must be lowercase"));
        }
        if repository.is_empty() || !repository.split('/').all(valid_path_component) {
            return Err(invalid("invalid repository name"));
        }
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(invalid("name too long"));
        }

        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_string()),
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host (and port) serving the registry's API: Docker Hub's is not `docker.io`.
    pub fn api_host(&self) -> &str {
        api_host(&self.registry)
    }

    /// What the manifest endpoint is asked for: the digest when pinned, else the tag.
    pub fn manifest_target(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The same repository pinned to `digest`, without tag.
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest),
        }
    }
}

impl std::str::FromStr for Reference {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Reference::parse(s)
    }
}

pub(crate) fn api_host(registry: &str) -> &str {
    if registry == DOCKER_HUB {
        DOCKER_HUB_API
    } else {
        registry
    }
}

fn valid_tag(t: &str) -> bool {
    let mut chars = t.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric() || c == '_')
        && t.len() <= MAX_TAG_LEN
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, the distribution spec's path component.
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn valid_registry(r: &str) -> bool {
    if r.is_empty() {
        return false;
    }
    let (host, port) = split_host_port(r);
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Splits `host[:port]`, keeping the brackets of `[v6]`.
pub(crate) fn split_host_port(r: &str) -> (&str, Option<&str>) {
    if r.starts_with('[') {
        return match r.find(']') {
            Some(end) => {
                let rest = &r[end + 1..];
                (&r[..=end], rest.strip_prefix(':'))
            }
            None => (r, None),
        };
    }
    match r.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (r, None),
    }
}

/// Whether requests to `registry` go over plain HTTP without being configured so.
pub(crate) fn is_loopback(registry: &str) -> bool {
    let (host, _) = split_host_port(registry);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<std::net::IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Reference {
        match Reference::parse(s) {
            Ok(r) => r,
            Err(e) => panic!("parse {s}: {e}"),
        }
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn docker_hub_normalisation() {
        let r = p("busybox");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/busybox");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.digest, None);
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        assert_eq!(r.api_host(), "registry-1.docker.io");

        assert_eq!(p("user/app:1.0").to_string(), "docker.io/user/app:1.0");
        assert_eq!(
            p("index.docker.io/library/alpine").to_string(),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(p("docker.io/alpine").repository, "library/alpine");
    }

    #[test]
    fn registries_with_ports() {
        let r = p("127.0.0.1:5000/busybox:latest");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "busybox");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.api_host(), "127.0.0.1:5000");

        let r = p("localhost:5000/x");
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.repository, "x");
        assert_eq!(r.tag.as_deref(), Some("latest"));

        let r = p("localhost/a/b");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("localhost", "a/b")
        );
        let r = p("[::1]:5000/a:t");
        assert_eq!(
            (r.registry.as_str(), r.tag.as_deref()),
            ("[::1]:5000", Some("t"))
        );
        let r = p("ghcr.io/org/sub/img:v1.2-rc_3");
        assert_eq!(r.repository, "org/sub/img");
        assert_eq!(r.tag.as_deref(), Some("v1.2-rc_3"));
    }

    #[test]
    fn digests() {
        let r = p(&format!("repo@{D}"));
        assert_eq!(r.repository, "library/repo");
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_ref().map(|d| d.as_str()), Some(D));
        assert_eq!(r.manifest_target(), D);
        assert_eq!(r.to_string(), format!("docker.io/library/repo@{D}"));

        let r = p(&format!("127.0.0.1:5000/repo:tag@{D}"));
        assert_eq!(r.tag.as_deref(), Some("tag"));
        assert_eq!(r.manifest_target(), D);
        assert_eq!(r.to_string(), format!("127.0.0.1:5000/repo:tag@{D}"));
        assert_eq!(Reference::parse(&r.to_string()).ok(), Some(r));
    }

    #[test]
    fn rejects_invalid() {
        for bad in [
            "",
            "Busybox",
            "library/Busybox",
            "127.0.0.1:5000/BusyBox:latest",
            "busybox:",
            "busybox:-tag",
            "busybox@sha256:abc",
            &format!("busybox@sha512:{}", "a".repeat(64)),
            "bad repo",
            "a//b",
            "-a",
            "a-",
            "a..b",
            "a___b",
            "host:port/x",
            "/x",
            "x/",
            &format!("x:{}", "t".repeat(129)),
            &"a".repeat(300),
        ] {
            match Reference::parse(bad) {
                Err(Error::InvalidReference(_)) => {}
                other => panic!("{bad:?} parsed as {other:?}"),
            }
        }
        assert!(Reference::parse("a__b-c.d---e").is_ok());
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("127.3.2.1"));
        assert!(is_loopback("localhost"));
        assert!(is_loopback("localhost:5001"));
        assert!(is_loopback("[::1]:5000"));
        assert!(is_loopback("[::1]"));
        assert!(!is_loopback("docker.io"));
        assert!(!is_loopback("128.0.0.1:5000"));
        assert!(!is_loopback("localhost.example.com"));
    }
}
