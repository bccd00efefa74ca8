//! Listening Unix sockets put in place in one step: vsock's host side and rvmm's API socket.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Something other than a socket is in the way.
    #[error("{} exists and is not a socket", .0.display())]
    NotSocket(PathBuf),
    /// Another process listens there.
    #[error("{} is in use by another listener", .0.display())]
    InUse(PathBuf),
    /// Binding the socket failed.
    #[error("cannot bind {}", .path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Binds a non-blocking listening socket at `path`, replacing a socket file nobody listens on.
/// The socket is bound and listening under a temporary name first and then renamed into
/// place, so `path` never names a socket that refuses connections, and a stale file is
/// replaced in one step.
pub fn listen_at(path: &Path) -> Result<UnixListener, ListenError> {
    let bind_err = |source| ListenError::Bind {
        path: path.to_owned(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ListenError::NotSocket(path.to_owned()))
        }
        Ok(_) if UnixStream::connect(path).is_ok() => {
            return Err(ListenError::InUse(path.to_owned()))
        }
        // Absent, or left behind by a process that is gone.
        Ok(_) | Err(_) => {}
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    // A leftover of an earlier rvmm with the same pid.
    let _ = fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(bind_err)?;
    let placed = listener
        .set_nonblocking(true)
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = fs::remove_file(&tmp);
        return Err(bind_err(e));
    }
    Ok(listener)
}
