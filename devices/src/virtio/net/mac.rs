//! MAC addresses: parsing `--net …,mac=` and generating one when none is given.

use std::fmt::Write as _;
use std::io;

use crate::virtio::rng::handler::getrandom;

/// Why a MAC address was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MacError {
    /// Not six colon-separated hex pairs.
    #[error("invalid MAC address {0:?} (expected six hex pairs like 52:54:00:12:34:56)")]
    Format(String),
    /// A multicast or all-zero address, which no NIC may use as its own.
    #[error("MAC address {0} is not a unicast address")]
    NotUnicast(String),
}

/// Parses `aa:bb:cc:dd:ee:ff` (either case) into a unicast address.
pub fn parse_mac(s: &str) -> Result<[u8; 6], MacError> {
    let format = || MacError::Format(s.into());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(format)?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| format())?;
    }
    if parts.next().is_some() {
        return Err(format());
    }
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(MacError::NotUnicast(s.into()));
    }
    Ok(mac)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let mut out = String::with_capacity(17);
    for (i, byte) in mac.iter().enumerate() {
        let sep = if i == 0 { "" } else { ":" };
        // Writing to a String cannot fail.
        let _ = write!(out, "{sep}{byte:02x}");
    }
    out
}

/// A random locally administered unicast address.
pub fn random_mac() -> io::Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    if getrandom(&mut mac)? < mac.len() {
        // Only before the host's entropy pool is initialized, in early boot.
        return Err(io::ErrorKind::WouldBlock.into());
    }
    // Clear the multicast bit, set the locally administered one.
    mac[0] = (mac[0] & !1) | 2;
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_format() {
        let mac = parse_mac("52:54:00:Ab:cD:ef").unwrap();
        assert_eq!(mac, [0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
        assert_eq!(format_mac(&mac), "52:54:00:ab:cd:ef");
    }

    #[test]
    fn bad_macs_are_refused() {
        for s in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5",
            "52-54-00-12-34-56",
            "52:54:00:12:34:5g",
            "52:54:00:12:34:+5",
            "525:4:00:12:34:56",
            "52:54:00:12:34:56:",
        ] {
            assert_eq!(parse_mac(s), Err(MacError::Format(s.into())), "{s:?}");
        }
        for s in [
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
        ] {
            assert_eq!(parse_mac(s), Err(MacError::NotUnicast(s.into())), "{s:?}");
        }
    }

    #[test]
    fn random_macs_are_local_unicast_and_differ() {
        let a = random_mac().unwrap();
        let b = random_mac().unwrap();
        assert_ne!(a, b);
        for mac in [a, b] {
            assert_eq!(mac[0] & 3, 2, "{}", format_mac(&mac));
            assert_eq!(parse_mac(&format_mac(&mac)), Ok(mac));
        }
    }
}
