//! `rvmm run`'s network: user-mode networking through passt by default (`--net user` of the VM
//! it starts, which gives the guest 10.0.2.15/24 through 10.0.2.2), TAP devices for root users
//! (`--net tap=`), or none. Published ports and passt itself are checked here, before anything
//! boots.

use rvmm_vmm::config::{ConfigError, PublishConfig};
use rvmm_vmm::passt::{self, PasstError};

/// `--network`: which network the container gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    /// User-mode networking through a passt that the VM's rvmm starts.
    User,
    /// No network: the container gets an empty network namespace.
    None,
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("--network none cannot be combined with --net")]
    NoneWithTap,
    #[error("-p/--publish needs the user network (it is off with --network none or --net alone)")]
    PublishWithoutUserNet,
    #[error(transparent)]
    BadPublish(#[from] ConfigError),
    #[error("the user network (the default) needs passt (apt-get install passt); --network none runs without")]
    NoPasst,
    #[error(transparent)]
    Passt(#[from] PasstError),
}

/// The VM's `--net` options: `--network user` (the default) first, then the `--net` TAPs. Without
/// `--network`, TAPs replace the default user network.
pub fn vm_nets(network: Option<Network>, taps: &[String]) -> Result<Vec<String>, NetworkError> {
    let user = match network {
        Some(Network::None) if !taps.is_empty() => return Err(NetworkError::NoneWithTap),
        Some(Network::None) => false,
        Some(Network::User) => true,
        None => taps.is_empty(),
    };
    let mut nets: Vec<String> = user.then(|| "user".to_string()).into_iter().collect();
    nets.extend_from_slice(taps);
    Ok(nets)
}

/// Refuses, before the VM starts, what its rvmm would refuse only after the guest's boot had
/// begun: `-p` without the user network, a malformed `-p`, a busy host port, no passt.
pub fn preflight(nets: &[String], publish: &[String]) -> Result<(), NetworkError> {
    let user = nets.iter().any(|n| n == "user");
    if !publish.is_empty() && !user {
        return Err(NetworkError::PublishWithoutUserNet);
    }
    if !user {
        return Ok(());
    }
    let publish = publish
        .iter()
        .map(|p| p.parse::<PublishConfig>())
        .collect::<Result<Vec<_>, _>>()?;
    passt::preflight(&publish).map_err(|e| match e {
        PasstError::NotInstalled => NetworkError::NoPasst,
        e => NetworkError::Passt(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn user_networking_is_the_default() {
        let tap = strings(&["tap=t0"]);
        assert_eq!(vm_nets(None, &[]).unwrap(), ["user"]);
        assert_eq!(vm_nets(Some(Network::User), &[]).unwrap(), ["user"]);
        assert!(vm_nets(Some(Network::None), &[]).unwrap().is_empty());
        assert_eq!(vm_nets(None, &tap).unwrap(), ["tap=t0"]);
        assert_eq!(
            vm_nets(Some(Network::User), &tap).unwrap(),
            ["user", "tap=t0"]
        );
        assert!(matches!(
            vm_nets(Some(Network::None), &tap),
            Err(NetworkError::NoneWithTap)
        ));
    }

    #[test]
    fn publish_needs_the_user_network_and_a_free_port() {
        let publish = strings(&["127.0.0.1:18083:80"]);
        for nets in [vec![], strings(&["tap=t0"])] {
            assert!(matches!(
                preflight(&nets, &publish),
                Err(NetworkError::PublishWithoutUserNet)
            ));
        }
        preflight(&[], &[]).unwrap();
        let user = strings(&["user"]);
        let err = preflight(&user, &strings(&["80"])).unwrap_err();
        assert!(matches!(err, NetworkError::BadPublish(_)), "{err}");
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let busy = strings(&[&format!("127.0.0.1:{port}:80")]);
        // Without passt installed the first complaint is that instead.
        let err = preflight(&user, &busy).unwrap_err();
        assert!(
            matches!(
                err,
                NetworkError::Passt(PasstError::PortBusy { .. }) | NetworkError::NoPasst
            ),
            "{err}"
        );
    }
}
