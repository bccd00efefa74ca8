//! A container's network namespace, handed to its VM the way Kata does: rvmm's TAP is made in
//! the namespace beside the interface the caller (podman's CNI, containerd) set up there, tc
//! redirects every frame between the two, and the guest's eth0 takes that interface's MAC,
//! addresses, MTU and default route. So the caller's bridge, port forwarding and DNS work as
//! they would for a container on the host.

use std::path::Path;
use std::process::Command;

use rvmm_agent::protocol::GuestNetwork;
use serde_json::Value;

/// The TAP rvmm opens inside the namespace.
pub const TAP: &str = "rvmmtap0";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot run {0}")]
    Spawn(String, #[source] std::io::Error),
    #[error("`{cmd}` failed: {said}")]
    Failed { cmd: String, said: String },
    #[error("cannot read `{0}`'s output")]
    Json(String, #[source] serde_json::Error),
}

/// `ip`/`tc` ARGS inside the namespace at `netns`; their stdout.
fn in_netns(netns: &Path, args: &[&str]) -> Result<Vec<u8>, NetworkError> {
    let cmd = args.join(" ");
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(args)
        .output()
        .map_err(|e| NetworkError::Spawn(cmd.clone(), e))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(NetworkError::Failed { cmd, said });
    }
    Ok(out.stdout)
}

fn json(netns: &Path, args: &[&str]) -> Result<Value, NetworkError> {
    let out = in_netns(netns, args)?;
    serde_json::from_slice(&out).map_err(|e| NetworkError::Json(args.join(" "), e))
}

/// The interface the caller made and what the guest must copy from it: `ip -j addr` and
/// `ip -j route show default` output. None when there is only loopback (`--network none`).
pub fn guest_network(addrs: &Value, routes: &Value) -> Option<(String, GuestNetwork)> {
    let link = addrs
        .as_array()?
        .iter()
        .find(|l| l["link_type"] == "ether" && l["ifname"] != TAP)?;
    let name = link["ifname"].as_str()?.to_string();
    let addresses = link["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["scope"] == "global")
        .filter_map(|a| {
            Some(format!(
                "{}/{}",
                a["local"].as_str()?,
                a["prefixlen"].as_u64()?
            ))
        })
        .collect();
    let gateway = routes
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["dev"] == name.as_str())
        .and_then(|r| r["gateway"].as_str())
        .map(str::to_string);
    let net = GuestNetwork {
        mac: link["address"].as_str()?.to_string(),
        addresses,
        gateway,
        mtu: link["mtu"].as_u64().unwrap_or(1500) as u32,
        sysctls: Vec::new(),
    };
    Some((name, net))
}

/// Reads the namespace's interface and wires a TAP to it; what the guest's eth0 must be, or
/// None when the namespace has no interface to share.
pub fn attach(netns: &Path) -> Result<Option<GuestNetwork>, NetworkError> {
    let addrs = json(netns, &["ip", "-j", "addr", "show"])?;
    let routes = json(netns, &["ip", "-j", "route", "show", "default"])?;
    let Some((link, net)) = guest_network(&addrs, &routes) else {
        return Ok(None);
    };
    let mtu = net.mtu.to_string();
    // A leftover from an earlier keeper in the same namespace goes first.
    let _ = in_netns(netns, &["ip", "link", "del", TAP]);
    let steps: [&[&str]; 7] = [
        &["ip", "tuntap", "add", "dev", TAP, "mode", "tap"],
        &["ip", "link", "set", TAP, "mtu", &mtu, "up"],
        &["tc", "qdisc", "add", "dev", &link, "ingress"],
        &["tc", "qdisc", "add", "dev", TAP, "ingress"],
        &[
            "tc", "filter", "add", "dev", &link, "parent", "ffff:", "matchall", "action", "mirred",
            "egress", "redirect", "dev", TAP,
        ],
        &[
            "tc", "filter", "add", "dev", TAP, "parent", "ffff:", "matchall", "action", "mirred",
            "egress", "redirect", "dev", &link,
        ],
        // The frames are the guest's now: the namespace's own stack must not answer them.
        &["ip", "addr", "flush", "dev", &link],
    ];
    for step in steps {
        in_netns(netns, step)?;
    }
    Ok(Some(net))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn copies_the_callers_interface() {
        let addrs = json!([
            {"ifname": "lo", "link_type": "loopback", "mtu": 65536, "address": "00:00:00:00:00:00",
             "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host"}]},
            {"ifname": "eth0", "link_type": "ether", "mtu": 1450, "address": "0a:58:0a:58:00:05",
             "addr_info": [
                {"family": "inet", "local": "10.88.0.5", "prefixlen": 16, "scope": "global"},
                {"family": "inet6", "local": "fe80::1", "prefixlen": 64, "scope": "link"}]},
        ]);
        let routes = json!([{"dst": "default", "gateway": "10.88.0.1", "dev": "eth0"}]);
        let (link, net) = guest_network(&addrs, &routes).unwrap();
        assert_eq!(link, "eth0");
        assert_eq!(
            net,
            GuestNetwork {
                mac: "0a:58:0a:58:00:05".into(),
                addresses: vec!["10.88.0.5/16".into()],
                gateway: Some("10.88.0.1".into()),
                mtu: 1450,
                sysctls: Vec::new(),
            }
        );
        // Only loopback (--network none): nothing to share.
        let lo_only = json!([addrs[0]]);
        assert_eq!(guest_network(&lo_only, &json!([])), None);
    }
}
