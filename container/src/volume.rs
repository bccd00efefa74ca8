//! `-v HOSTDIR:GUESTDIR[:ro|:rw]`: a host directory in the container. rvmm shares the
//! directory with the VM (`--share`, a virtiofsd of its own, read-only on the host for `ro`)
//! and the agent binds the guest's mount of it at GUESTDIR.

use std::io;
use std::path::PathBuf;

use rvmm_agent::protocol::Volume;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("-v {0:?}: expected HOSTDIR:GUESTDIR[:ro|:rw]")]
    Syntax(String),
    #[error("-v {spec:?}: cannot use {host:?}")]
    Host {
        spec: String,
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("-v {0:?}: the host path is not a directory (only directories can be shared)")]
    NotADirectory(String),
    #[error("-v {0:?}: the host path holds a comma, which --share cannot carry")]
    Comma(String),
    #[error("-v {0:?}: the container path must be absolute and not /")]
    Destination(String),
}

/// One parsed `-v`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeSpec {
    /// The host directory, made absolute with symbolic links resolved.
    pub host: PathBuf,
    pub destination: String,
    pub read_only: bool,
}

impl VolumeSpec {
    pub fn parse(spec: &str) -> Result<VolumeSpec, VolumeError> {
        let syntax = || VolumeError::Syntax(spec.to_string());
        let mut parts = spec.split(':');
        let (host, destination) = match (parts.next(), parts.next()) {
            (Some(h), Some(d)) if !h.is_empty() && !d.is_empty() => (h, d),
            _ => return Err(syntax()),
        };
        let read_only = match parts.next() {
            None | Some("rw") => false,
            Some("ro") => true,
            Some(_) => return Err(syntax()),
        };
        if parts.next().is_some() {
            return Err(syntax());
        }
        if !destination.starts_with('/') || destination.trim_end_matches('/').is_empty() {
            return Err(VolumeError::Destination(spec.to_string()));
        }
        let host = std::fs::canonicalize(host).map_err(|source| VolumeError::Host {
            spec: spec.to_string(),
            host: host.to_string(),
            source,
        })?;
        if !host.is_dir() {
            return Err(VolumeError::NotADirectory(spec.to_string()));
        }
        if host.to_string_lossy().contains(',') {
            return Err(VolumeError::Comma(spec.to_string()));
        }
        Ok(VolumeSpec {
            host,
            destination: destination.to_string(),
            read_only,
        })
    }

    /// The virtio-fs tag of the `index`th volume.
    fn tag(index: usize) -> String {
        format!("rvmm-v{index}")
    }

    /// rvmm's `--share` option for the `index`th volume.
    pub fn share_spec(&self, index: usize) -> String {
        let ro = if self.read_only { ",ro" } else { "" };
        format!("{},tag={}{ro}", self.host.display(), Self::tag(index))
    }

    /// What the agent gets for the `index`th volume.
    pub fn volume(&self, index: usize) -> Volume {
        Volume {
            tag: Self::tag(index),
            destination: self.destination.clone(),
            read_only: self.read_only,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    #[test]
    fn parses_directories_and_modes() {
        let dir = TempDir::new().unwrap();
        let host = std::fs::canonicalize(dir.as_path()).unwrap();
        let d = host.display().to_string();
        let rw = VolumeSpec::parse(&format!("{d}:/data")).unwrap();
        assert_eq!((rw.host.clone(), rw.read_only), (host.clone(), false));
        assert_eq!(rw.share_spec(0), format!("{d},tag=rvmm-v0"));
        let ro = VolumeSpec::parse(&format!("{d}/.:/etc/x/:ro")).unwrap();
        assert_eq!(ro.host, host);
        assert_eq!(ro.share_spec(2), format!("{d},tag=rvmm-v2,ro"));
        assert_eq!(
            ro.volume(2),
            Volume {
                tag: "rvmm-v2".into(),
                destination: "/etc/x/".into(),
                read_only: true,
            }
        );
        assert!(
            !VolumeSpec::parse(&format!("{d}:/data:rw"))
                .unwrap()
                .read_only
        );
    }

    #[test]
    fn refuses_bad_specs() {
        let dir = TempDir::new().unwrap();
        let d = dir.as_path().display().to_string();
        let file = dir.as_path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let comma = dir.as_path().join("a,b");
        std::fs::create_dir(&comma).unwrap();
        let cases = [
            (d.clone(), "expected HOSTDIR:GUESTDIR"),
            (format!("{d}:"), "expected HOSTDIR:GUESTDIR"),
            (":/data".to_string(), "expected HOSTDIR:GUESTDIR"),
            (format!("{d}:/data:rx"), "expected HOSTDIR:GUESTDIR"),
            (format!("{d}:/data:ro:x"), "expected HOSTDIR:GUESTDIR"),
            (format!("{d}:data"), "must be absolute and not /"),
            (format!("{d}:/"), "must be absolute and not /"),
            (format!("{d}/missing:/data"), "cannot use"),
            (format!("{}:/data", file.display()), "not a directory"),
            (format!("{}:/data", comma.display()), "holds a comma"),
        ];
        for (spec, needle) in cases {
            let err = VolumeSpec::parse(&spec).unwrap_err().to_string();
            assert!(err.contains(needle), "{spec}: {err}");
        }
    }
}
