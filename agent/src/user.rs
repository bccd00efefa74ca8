//! Resolves an image config's `User` ("name", "uid", "name:group", "uid:gid", or empty for
//! root) against the image's own /etc/passwd and /etc/group, as container engines do.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("user {0:?} is not in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("group {0:?} is not in the image's /etc/group")]
    UnknownGroup(String),
}

/// Who the container process runs as.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups listing the user by name in /etc/group.
    pub additional_gids: Vec<u32>,
}

/// Fields of each well-formed line of a colon-separated database.
fn records(db: &str) -> impl Iterator<Item = Vec<&str>> {
    db.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
}

/// `spec` resolved with the contents of /etc/passwd and /etc/group (empty when missing).
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<ResolvedUser, UserError> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    let entry = records(passwd).find(|f| f[0] == user || f[2] == user);
    let (uid, mut gid, name) = match (entry, user.parse::<u32>()) {
        (Some(f), _) => (
            f[2].parse()
                .map_err(|_| UserError::UnknownUser(user.into()))?,
            f[3].parse().unwrap_or(0),
            Some(f[0]),
        ),
        // A numeric uid needs no passwd entry; it then has group 0.
        (None, Ok(uid)) => (uid, 0, None),
        (None, Err(_)) => return Err(UserError::UnknownUser(user.into())),
    };
    if let Some(grp) = grp.filter(|g| !g.is_empty()) {
        gid = match records(group).find(|f| f[0] == grp || f[2] == grp) {
            Some(f) => f[2]
                .parse()
                .map_err(|_| UserError::UnknownGroup(grp.into()))?,
            None => grp
                .parse()
                .map_err(|_| UserError::UnknownGroup(grp.into()))?,
        };
    }
    let additional_gids = match name {
        Some(name) if grp.is_none() => records(group)
            .filter(|f| f[3].split(',').any(|m| m == name))
            .filter_map(|f| f[2].parse().ok())
            .filter(|&g| g != gid)
            .collect(),
        _ => Vec::new(),
    };
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n# comment\nnobody:x:65534:65534::/:/bin/false\napp:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:app,other\napp:x:1000:\nnogroup:x:65534:\n";

    fn user(uid: u32, gid: u32, extra: &[u32]) -> ResolvedUser {
        ResolvedUser {
            uid,
            gid,
            additional_gids: extra.to_vec(),
        }
    }

    #[test]
    fn names_and_numbers() {
        assert_eq!(resolve("", PASSWD, GROUP), Ok(user(0, 0, &[])));
        assert_eq!(resolve("app", PASSWD, GROUP), Ok(user(1000, 1000, &[10])));
        assert_eq!(resolve("1000", PASSWD, GROUP), Ok(user(1000, 1000, &[10])));
        assert_eq!(resolve("app:wheel", PASSWD, GROUP), Ok(user(1000, 10, &[])));
        assert_eq!(resolve("nobody:0", PASSWD, GROUP), Ok(user(65534, 0, &[])));
        assert_eq!(resolve("4242:4343", "", ""), Ok(user(4242, 4343, &[])));
        assert_eq!(resolve("4242", "", ""), Ok(user(4242, 0, &[])));
    }

    #[test]
    fn unknown_names_are_errors() {
        assert_eq!(
            resolve("ghost", PASSWD, GROUP),
            Err(UserError::UnknownUser("ghost".into()))
        );
        assert_eq!(
            resolve("app:ghosts", PASSWD, GROUP),
            Err(UserError::UnknownGroup("ghosts".into()))
        );
    }
}
