//! Where rvmm keeps what it builds for containers: image disks, the container guest and
//! start-up snapshots.

use std::path::PathBuf;

/// `${XDG_CACHE_HOME:-$HOME/.cache}/rvmm`.
pub fn cache_base() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/".into())).join(".cache")
        })
        .join("rvmm")
}

/// Where `rvmm run` keeps its start-up snapshots (`warm`).
pub fn snapshots() -> PathBuf {
    cache_base().join("snapshots")
}
