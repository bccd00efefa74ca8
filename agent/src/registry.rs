//! The containers of one VM by name: what `rvmm ps` lists, `rvmm exec/stop/kill` find, and
//! what keeps two running containers from sharing a name. A name is also the container's crun
//! id and its bundle's directory name, hence the strict alphabet.

use std::collections::BTreeMap;

use crate::protocol::{ContainerInfo, ExitStatus};

const MAX_NAME: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("container name {0:?} is invalid (letters, digits, '_', '.', '-', at most 64, not first '.' or '-')")]
    BadName(String),
    #[error("a container named {0:?} is already running")]
    InUse(String),
    #[error("no running container named {0:?}")]
    NotRunning(String),
    #[error("no container is running")]
    NoneRunning,
    #[error("{0} containers are running: name one")]
    Ambiguous(usize),
}

/// What the host asked to run, and whether anyone waits for it.
pub struct NewContainer<'a> {
    pub name: Option<&'a str>,
    pub image: &'a str,
    pub command: &'a [String],
    /// Detached containers stay listed after their end, with their exit status.
    pub detached: bool,
}

struct Entry {
    info: ContainerInfo,
    detached: bool,
}

#[derive(Default)]
pub struct Registry {
    entries: BTreeMap<String, Entry>,
    unnamed: u32,
}

impl Registry {
    pub const fn new() -> Registry {
        Registry {
            entries: BTreeMap::new(),
            unnamed: 0,
        }
    }

    /// Records a starting container and returns its name: the requested one (which an ended
    /// container gives up) or `c1`, `c2`, ….
    pub fn claim(&mut self, new: &NewContainer) -> Result<String, RegistryError> {
        let name = match new.name {
            Some(name) => {
                check_name(name)?;
                if self
                    .entries
                    .get(name)
                    .is_some_and(|e| e.info.exit.is_none())
                {
                    return Err(RegistryError::InUse(name.into()));
                }
                name.to_string()
            }
            None => loop {
                self.unnamed += 1;
                let name = format!("c{}", self.unnamed);
                if !self.entries.contains_key(&name) {
                    break name;
                }
            },
        };
        let info = ContainerInfo {
            name: name.clone(),
            image: new.image.into(),
            command: new.command.to_vec(),
            exit: None,
        };
        let detached = new.detached;
        self.entries.insert(name.clone(), Entry { info, detached });
        Ok(name)
    }

    /// The container ended: an attached one is forgotten, a detached one keeps its status.
    pub fn ended(&mut self, name: &str, status: ExitStatus) {
        match self.entries.get_mut(name) {
            Some(e) if e.detached => e.info.exit = Some(status),
            Some(_) => {
                self.entries.remove(name);
            }
            None => {}
        }
    }

    /// A container that never started.
    pub fn forget(&mut self, name: &str) {
        self.entries.remove(name);
    }

    /// The running container `name`, or with None the only running one.
    pub fn running(&self, name: Option<&str>) -> Result<String, RegistryError> {
        let mut running = self.entries.values().filter(|e| e.info.exit.is_none());
        match name {
            Some(name) => running
                .find(|e| e.info.name == name)
                .map(|e| e.info.name.clone())
                .ok_or_else(|| RegistryError::NotRunning(name.into())),
            None => match (running.next(), running.count()) {
                (Some(e), 0) => Ok(e.info.name.clone()),
                (None, _) => Err(RegistryError::NoneRunning),
                (Some(_), more) => Err(RegistryError::Ambiguous(more + 1)),
            },
        }
    }

    pub fn list(&self) -> Vec<ContainerInfo> {
        self.entries.values().map(|e| e.info.clone()).collect()
    }
}

/// A container's or a shared VM's name: a word that is also a safe file and crun id.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn check_name(name: &str) -> Result<(), RegistryError> {
    valid_name(name)
        .then_some(())
        .ok_or_else(|| RegistryError::BadName(name.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(name: Option<&str>, detached: bool) -> NewContainer<'_> {
        NewContainer {
            name,
            image: "img.ext4",
            command: &[],
            detached,
        }
    }

    #[test]
    fn names_are_unique_among_running_containers() {
        let mut r = Registry::default();
        assert_eq!(r.claim(&new(Some("web"), true)).unwrap(), "web");
        assert_eq!(
            r.claim(&new(Some("web"), false)),
            Err(RegistryError::InUse("web".into()))
        );
        assert_eq!(r.claim(&new(None, false)).unwrap(), "c1");
        assert_eq!(r.claim(&new(Some("c2"), false)).unwrap(), "c2");
        assert_eq!(r.claim(&new(None, false)).unwrap(), "c3");
        r.ended("web", ExitStatus::Code(0));
        let web = |r: &Registry| r.list().into_iter().find(|c| c.name == "web").unwrap();
        assert_eq!(web(&r).exit, Some(ExitStatus::Code(0)));
        assert_eq!(r.claim(&new(Some("web"), false)).unwrap(), "web");
        assert_eq!(web(&r).exit, None);
    }

    #[test]
    fn attached_containers_are_forgotten_when_they_end() {
        let mut r = Registry::default();
        r.claim(&new(Some("a"), false)).unwrap();
        r.ended("a", ExitStatus::Signal(9));
        assert!(r.list().is_empty());
    }

    #[test]
    fn finds_the_running_container() {
        let mut r = Registry::default();
        assert_eq!(r.running(None), Err(RegistryError::NoneRunning));
        r.claim(&new(Some("a"), true)).unwrap();
        assert_eq!(r.running(None).unwrap(), "a");
        r.claim(&new(Some("b"), true)).unwrap();
        assert_eq!(r.running(None), Err(RegistryError::Ambiguous(2)));
        r.ended("b", ExitStatus::Code(1));
        assert_eq!(r.running(Some("a")).unwrap(), "a");
        assert_eq!(
            r.running(Some("b")),
            Err(RegistryError::NotRunning("b".into()))
        );
    }

    #[test]
    fn refuses_names_crun_or_a_path_would_misread() {
        let mut r = Registry::default();
        for bad in ["", ".x", "-x", "a/b", "a b", "..", &"x".repeat(65)] {
            assert!(
                matches!(
                    r.claim(&new(Some(bad), false)),
                    Err(RegistryError::BadName(_))
                ),
                "{bad:?}"
            );
        }
        assert!(r.claim(&new(Some("a.b_c-1"), false)).is_ok());
    }
}
