//! Docker-style image names: `app` -> (`app`, `latest`).

use crate::{Error, Result};

/// Splits `name[:tag]` into name and tag (`latest` when none), keeping the name as typed
/// (no `docker.io/library/` prefix), as `docker images` shows it. Digests (`@sha256:`)
/// are refused: a local name is a tag.
pub fn parse_image_name(s: &str) -> Result<(String, String)> {
    let bad = |why: &str| Error::InvalidArgument(format!("image name {s:?}: {why}"));
    if s.contains('@') {
        return Err(bad("digests cannot be used as local names"));
    }
    let last_slash = s.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match s[last_slash..].rfind(':') {
        Some(i) => (&s[..last_slash + i], &s[last_slash + i + 1..]),
        None => (s, "latest"),
    };
    if name.is_empty() {
        return Err(bad("empty name"));
    }
    if tag.is_empty() || tag.len() > 128 {
        return Err(bad("tag must be 1 to 128 characters"));
    }
    let mut tag_chars = tag.chars();
    let tag_ok = tag_chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && tag_chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !tag_ok {
        return Err(bad("tag may hold only letters, digits, '_', '.', '-'"));
    }
    let components: Vec<&str> = name.split('/').collect();
    let has_host = components.len() > 1
        && (components[0].contains(['.', ':']) || components[0] == "localhost");
    for (i, c) in components.iter().enumerate() {
        if c.is_empty() {
            return Err(bad("empty path component"));
        }
        let ok = if i == 0 && has_host {
            let (host, port) = c.split_once(':').unwrap_or((c, "0"));
            !host.is_empty()
                && host
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '-'))
                && !port.is_empty()
                && port.chars().all(|ch| ch.is_ascii_digit())
        } else {
            c.chars().all(|ch| {
                ch.is_ascii_lowercase() || ch.is_ascii_digit() || matches!(ch, '.' | '_' | '-')
            }) && c.starts_with(|ch: char| ch.is_ascii_alphanumeric())
        };
        if !ok {
            return Err(bad(
                "repository names may hold only lowercase letters, digits, '.', '_', '-'",
            ));
        }
    }
    Ok((name.to_string(), tag.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised_like_docker() {
        let ok = [
            ("app", ("app", "latest")),
            ("app:v1", ("app", "v1")),
            ("org/app:1.2-rc_3", ("org/app", "1.2-rc_3")),
            ("localhost:5000/app", ("localhost:5000/app", "latest")),
            ("127.0.0.1:5000/a/b:t", ("127.0.0.1:5000/a/b", "t")),
            (
                "docker.io/library/busybox",
                ("docker.io/library/busybox", "latest"),
            ),
        ];
        for (input, (n, t)) in ok {
            assert_eq!(
                parse_image_name(input).unwrap(),
                (n.to_string(), t.to_string()),
                "{input}"
            );
        }
        for bad in [
            "",
            ":v1",
            "app:",
            "App",
            "app@sha256:00",
            "a//b",
            "app:-x",
            "app:a/b",
            "my app",
            "/app",
            "app/",
        ] {
            assert!(parse_image_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
