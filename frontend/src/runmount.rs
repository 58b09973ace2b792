//! `RUN --mount=...` values, parsed as BuildKit's `instructions.parseMount` does (csv fields,
//! `type=bind` by default, values expanded with the step's environment) with its error texts.

/// The kind of a `RUN --mount`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MountType {
    Bind,
    Cache,
    Tmpfs,
    Secret,
    Ssh,
}

impl MountType {
    pub fn as_str(self) -> &'static str {
        match self {
            MountType::Bind => "bind",
            MountType::Cache => "cache",
            MountType::Tmpfs => "tmpfs",
            MountType::Secret => "secret",
            MountType::Ssh => "ssh",
        }
    }
}

/// One parsed `--mount` value (fields still relative: the lowering applies defaults that
/// depend on the stage, such as the working directory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunMount {
    pub kind: MountType,
    pub from: String,
    pub source: String,
    pub target: String,
    pub readonly: bool,
    pub size: Option<u64>,
    /// `id=`: the cache id, secret id or ssh id.
    pub id: String,
    /// `shared`, `private` or `locked`; empty when not given.
    pub sharing: String,
    pub required: bool,
    pub env: Option<String>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

const MOUNT_TYPES: &[&str] = &["bind", "cache", "tmpfs", "secret", "ssh"];
const SHARING_MODES: &[&str] = &["shared", "private", "locked"];
const ALL_KEYS: &[&str] = &[
    "type",
    "from",
    "source",
    "target",
    "readonly",
    "id",
    "sharing",
    "required",
    "size",
    "mode",
    "uid",
    "gid",
    "src",
    "dst",
    "destination",
    "ro",
    "rw",
    "readwrite",
    "env",
];

/// Parses one `--mount` value; `expand` expands a value with the step's environment.
pub fn parse_mount(
    value: &str,
    expand: &mut dyn FnMut(&str) -> Result<String, String>,
) -> Result<RunMount, String> {
    let fields = csv_fields(value).map_err(|e| format!("failed to parse csv mounts: {e}"))?;
    let mut m = RunMount {
        kind: MountType::Bind,
        from: String::new(),
        source: String::new(),
        target: String::new(),
        readonly: false,
        size: None,
        id: String::new(),
        sharing: String::new(),
        required: false,
        env: None,
        mode: None,
        uid: None,
        gid: None,
    };
    let mut ro_auto = true;
    for field in &fields {
        let (key, raw) = match field.split_once('=') {
            Some((k, v)) => (k.to_lowercase(), Some(v)),
            None => (field.to_lowercase(), None),
        };
        let Some(raw) = raw else {
            match key.as_str() {
                "readonly" | "ro" => {
                    m.readonly = true;
                    ro_auto = false;
                }
                "readwrite" | "rw" => {
                    m.readonly = false;
                    ro_auto = false;
                }
                "required" => {
                    if matches!(m.kind, MountType::Secret | MountType::Ssh) {
                        m.required = true;
                    } else {
                        return Err(format!(
                            "unexpected key '{key}' for mount type '{}'",
                            m.kind.as_str()
                        ));
                    }
                }
                _ => return Err(format!("invalid field '{field}' must be a key=value pair")),
            }
            continue;
        };
        if key == "from" {
            // Checked before expansion, as BuildKit's first pass does.
            if let Some(i) = raw.find('$') {
                if i != raw.len() - 1 {
                    return Err(format!(
                        "'{key}' doesn't support variable expansion, define alias stage instead"
                    ));
                }
            }
        }
        let value = expand(raw)?;
        let invalid = || format!("invalid value for {key}: {value}");
        match key.as_str() {
            "type" => {
                m.kind = match value.to_lowercase().as_str() {
                    "bind" => MountType::Bind,
                    "cache" => MountType::Cache,
                    "tmpfs" => MountType::Tmpfs,
                    "secret" => MountType::Secret,
                    "ssh" => MountType::Ssh,
                    _ => {
                        return Err(crate::suggest::wrap_error(
                            format!("unsupported mount type {value:?}"),
                            &value,
                            MOUNT_TYPES,
                            true,
                        ))
                    }
                }
            }
            "from" => m.from = value,
            "source" | "src" => m.source = value,
            "target" | "dst" | "destination" => m.target = value,
            "readonly" | "ro" => {
                m.readonly = parse_bool(&value).ok_or_else(invalid)?;
                ro_auto = false;
            }
            "readwrite" | "rw" => {
                m.readonly = !parse_bool(&value).ok_or_else(invalid)?;
                ro_auto = false;
            }
            "required" => {
                if matches!(m.kind, MountType::Secret | MountType::Ssh) {
                    m.required = parse_bool(&value).ok_or_else(invalid)?;
                } else {
                    return Err(format!(
                        "unexpected key '{key}' for mount type '{}'",
                        m.kind.as_str()
                    ));
                }
            }
            "size" => {
                if m.kind == MountType::Tmpfs {
                    m.size = Some(ram_in_bytes(&value).ok_or_else(invalid)?);
                } else {
                    return Err(format!(
                        "unexpected key '{key}' for mount type '{}'",
                        m.kind.as_str()
                    ));
                }
            }
            "id" => m.id = value,
            "sharing" => {
                let v = value.to_lowercase();
                if !SHARING_MODES.contains(&v.as_str()) {
                    return Err(crate::suggest::wrap_error(
                        format!("unsupported sharing value {value:?}"),
                        &value,
                        SHARING_MODES,
                        true,
                    ));
                }
                m.sharing = v;
            }
            "mode" => {
                m.mode = Some(
                    u32::from_str_radix(&value, 8)
                        .map_err(|_| format!("invalid value {value} for mode"))?,
                )
            }
            "uid" => {
                m.uid = Some(
                    value
                        .parse::<u32>()
                        .map_err(|_| format!("invalid value {value} for uid"))?,
                )
            }
            "gid" => {
                m.gid = Some(
                    value
                        .parse::<u32>()
                        .map_err(|_| format!("invalid value {value} for gid"))?,
                )
            }
            "env" => m.env = Some(value),
            _ => {
                return Err(crate::suggest::wrap_error(
                    format!("unexpected key '{key}' in '{field}'"),
                    &key,
                    ALL_KEYS,
                    true,
                ))
            }
        }
    }

    let file_info_allowed = matches!(
        m.kind,
        MountType::Secret | MountType::Ssh | MountType::Cache
    );
    if !file_info_allowed {
        for (name, set) in [
            ("mode", m.mode.is_some()),
            ("uid", m.uid.is_some()),
            ("gid", m.gid.is_some()),
        ] {
            if set {
                return Err(format!(
                    "{name} not allowed for \"{}\" type mounts",
                    m.kind.as_str()
                ));
            }
        }
    }
    if ro_auto {
        m.readonly = !matches!(m.kind, MountType::Cache | MountType::Tmpfs);
    }
    if m.kind == MountType::Secret {
        if !m.from.is_empty() {
            return Err("secret mount should not have a from".into());
        }
        if !m.sharing.is_empty() {
            return Err("secret mount should not define sharing".into());
        }
        if m.source.is_empty() && m.target.is_empty() && m.id.is_empty() {
            return Err("invalid secret mount. one of source, target required".into());
        }
        if !m.source.is_empty() && !m.id.is_empty() {
            return Err("both source and id can't be set".into());
        }
    }
    if !m.sharing.is_empty() && m.kind != MountType::Cache {
        return Err(format!(
            "invalid cache sharing set for {} mount",
            m.kind.as_str()
        ));
    }
    Ok(m)
}

/// Go's `strconv.ParseBool`.
fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// docker/go-units `RAMInBytes`: a number with an optional binary unit (`64m`, `1GiB`).
fn ram_in_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    let num: f64 = num.parse().ok()?;
    let unit = unit.trim().to_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let mult: f64 = match unit {
        "" => 1.0,
        "k" => 1024.0,
        "m" => 1024.0 * 1024.0,
        "g" => 1024.0 * 1024.0 * 1024.0,
        "t" => 1024f64.powi(4),
        "p" => 1024f64.powi(5),
        _ => return None,
    };
    let bytes = num * mult;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// Splits one csv record (RFC 4180 quoting, as Go's encoding/csv reads a line).
fn csv_fields(s: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                    None => return Err("extraneous or missing \" in quoted-field".into()),
                }
            }
            match chars.next() {
                None => {
                    fields.push(field);
                    return Ok(fields);
                }
                Some(',') => fields.push(field),
                Some(_) => return Err("extraneous or missing \" in quoted-field".into()),
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        fields.push(field);
                        return Ok(fields);
                    }
                    Some(',') => break,
                    Some('"') => return Err("bare \" in non-quoted-field".into()),
                    Some(c) => field.push(c),
                }
            }
            fields.push(field);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<RunMount, String> {
        parse_mount(s, &mut |v| Ok(v.replace("$DIR", "/expanded")))
    }

    #[test]
    fn defaults_by_type() {
        let b = parse("target=/src").unwrap();
        assert_eq!(b.kind, MountType::Bind);
        assert!(b.readonly);
        let c = parse("type=cache,target=/c").unwrap();
        assert!(!c.readonly);
        let rw = parse("type=bind,target=/x,rw").unwrap();
        assert!(!rw.readonly);
        let ro = parse("type=cache,target=/x,readonly=true").unwrap();
        assert!(ro.readonly);
        let s = parse("type=secret,id=tok,required,mode=0440,uid=1,gid=2,env=TOK").unwrap();
        assert_eq!(
            (s.required, s.mode, s.uid, s.gid, s.env.as_deref()),
            (true, Some(0o440), Some(1), Some(2), Some("TOK"))
        );
        let t = parse("type=tmpfs,dst=/t,size=64m").unwrap();
        assert_eq!(t.size, Some(64 << 20));
        let e = parse("type=cache,target=$DIR,\"id=a,b\"").unwrap();
        assert_eq!((e.target.as_str(), e.id.as_str()), ("/expanded", "a,b"));
    }

    #[test]
    fn errors_are_worded_like_buildkit() {
        assert_eq!(
            parse("type=cach,target=/c").unwrap_err(),
            "unsupported mount type \"cach\" (did you mean cache?)"
        );
        assert_eq!(
            parse("type=cache,tagret=/c").unwrap_err(),
            "unexpected key 'tagret' in 'tagret=/c' (did you mean target?)"
        );
        assert_eq!(
            parse("target=/c,required").unwrap_err(),
            "unexpected key 'required' for mount type 'bind'"
        );
        assert_eq!(
            parse("target=/c,bogus").unwrap_err(),
            "invalid field 'bogus' must be a key=value pair"
        );
        assert_eq!(
            parse("target=/c,mode=0755").unwrap_err(),
            "mode not allowed for \"bind\" type mounts"
        );
        assert_eq!(
            parse("type=cache,target=/c,mode=9").unwrap_err(),
            "invalid value 9 for mode"
        );
        assert_eq!(
            parse("type=cache,target=/c,sharing=lockd").unwrap_err(),
            "unsupported sharing value \"lockd\" (did you mean locked?)"
        );
        assert_eq!(
            parse("type=tmpfs,target=/c,sharing=locked").unwrap_err(),
            "invalid cache sharing set for tmpfs mount"
        );
        assert_eq!(
            parse("type=secret,from=x,id=a").unwrap_err(),
            "secret mount should not have a from"
        );
        assert_eq!(
            parse("type=secret,required").unwrap_err(),
            "invalid secret mount. one of source, target required"
        );
        assert_eq!(
            parse("type=secret,src=a,id=b").unwrap_err(),
            "both source and id can't be set"
        );
        assert_eq!(
            parse("target=/c,from=$STAGE").unwrap_err(),
            "'from' doesn't support variable expansion, define alias stage instead"
        );
        assert_eq!(
            parse("type=tmpfs,target=/c,size=lots").unwrap_err(),
            "invalid value for size: lots"
        );
        assert_eq!(
            parse("target=/c,ro=maybe").unwrap_err(),
            "invalid value for ro: maybe"
        );
        assert!(parse("target=\"/c")
            .unwrap_err()
            .starts_with("failed to parse csv mounts:"));
    }
}
