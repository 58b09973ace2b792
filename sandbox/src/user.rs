//! `USER` resolution against the root's /etc/passwd and /etc/group, with runc's semantics.

/// The identity the step's process runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ExecUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (groups in /etc/group that list the user's name).
    pub groups: Vec<u32>,
    pub home: String,
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|line| {
        if line.trim().is_empty() || line.starts_with('#') {
            return None;
        }
        let fields: Vec<&str> = line.split(':').collect();
        // Malformed lines are skipped rather than failing the step, as libc does.
        Some(PasswdEntry {
            name: fields.first().copied()?,
            uid: fields.get(2)?.trim().parse().ok()?,
            gid: fields.get(3)?.trim().parse().ok()?,
            home: fields.get(5).copied().unwrap_or(""),
        })
    })
}

fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    text.lines().filter_map(|line| {
        if line.trim().is_empty() || line.starts_with('#') {
            return None;
        }
        let fields: Vec<&str> = line.split(':').collect();
        Some(GroupEntry {
            name: fields.first().copied()?,
            gid: fields.get(2)?.trim().parse().ok()?,
            members: fields
                .get(3)
                .map(|m| {
                    m.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        })
    })
}

/// Resolves `spec` (`name`, `uid`, `name:group`, `uid:gid`, or empty for root). `passwd` and
/// `group` are the files' contents, `None` when missing.
pub(crate) fn resolve(
    spec: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<ExecUser, String> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let passwd = passwd.unwrap_or("");
    let group = group.unwrap_or("");

    let numeric_uid: Option<u32> = user_part.parse().ok();
    let entry = match numeric_uid {
        Some(uid) => passwd_entries(passwd).find(|e| e.uid == uid),
        None => passwd_entries(passwd).find(|e| e.name == user_part),
    };
    let (uid, mut gid, home, name) = match (&entry, numeric_uid) {
        (Some(e), _) => (e.uid, e.gid, e.home.to_string(), Some(e.name)),
        // A numeric uid without an entry is allowed: group 0, home /.
        (None, Some(uid)) => (uid, 0, String::new(), None),
        (None, None) => {
            return Err(format!(
                "unable to find user {user_part}: no matching entries in passwd file"
            ))
        }
    };

    let mut groups = Vec::new();
    match group_part.filter(|g| !g.is_empty()) {
        Some(g) => {
            gid = match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => group_entries(group)
                    .find(|e| e.name == g)
                    .map(|e| e.gid)
                    .ok_or_else(|| {
                        format!("unable to find group {g}: no matching entries in group file")
                    })?,
            };
        }
        None => {
            if let Some(name) = name {
                for e in group_entries(group) {
                    if e.members.contains(&name) && !groups.contains(&e.gid) {
                        groups.push(e.gid);
                    }
                }
            }
        }
    }
    let home = if home.is_empty() {
        "/".to_string()
    } else {
        home
    };
    Ok(ExecUser {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # comment\n\
        broken line\n\
        app:x:1000:1000:App:/home/app:/bin/sh\n\
        nohome:x:1001:1001::\n";
    const GROUP: &str = "root:x:0:root\napp:x:1000:\nstaff:x:50:app,other\nwheel:x:10:root,app\n";

    fn r(spec: &str) -> Result<ExecUser, String> {
        resolve(spec, Some(PASSWD), Some(GROUP))
    }

    #[test]
    fn empty_is_root() {
        assert_eq!(
            r("").unwrap(),
            ExecUser {
                uid: 0,
                gid: 0,
                groups: vec![0, 10],
                home: "/root".into()
            }
        );
    }

    #[test]
    fn name_resolves_with_supplementary_groups() {
        assert_eq!(
            r("app").unwrap(),
            ExecUser {
                uid: 1000,
                gid: 1000,
                groups: vec![50, 10],
                home: "/home/app".into()
            }
        );
    }

    #[test]
    fn numeric_uid_uses_entry_or_defaults() {
        assert_eq!(r("1000").unwrap().home, "/home/app");
        assert_eq!(
            r("4242").unwrap(),
            ExecUser {
                uid: 4242,
                gid: 0,
                groups: vec![],
                home: "/".into()
            }
        );
        assert_eq!(r("1001").unwrap().home, "/");
    }

    #[test]
    fn explicit_group_replaces_primary_and_drops_supplementary() {
        let u = r("app:staff").unwrap();
        assert_eq!((u.uid, u.gid, u.groups), (1000, 50, vec![]));
        let u = r("1000:7").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 7));
    }

    #[test]
    fn unknown_names_fail_like_runc() {
        assert_eq!(
            r("nobody").unwrap_err(),
            "unable to find user nobody: no matching entries in passwd file"
        );
        assert_eq!(
            r("app:nogroup").unwrap_err(),
            "unable to find group nogroup: no matching entries in group file"
        );
        assert_eq!(
            resolve("app", None, None).unwrap_err(),
            "unable to find user app: no matching entries in passwd file"
        );
    }

    #[test]
    fn missing_files_allow_numeric() {
        let u = resolve("0", None, None).unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (0, 0, "/"));
    }
}
