//! Which networks backends may not point at.
//!
//! A backend address is where every Varnish server of a cluster connects on behalf of clients, so
//! a backend in the wrong network turns the cache into a proxy to it: link-local addresses reach
//! cloud metadata services (169.254.169.254) and are denied by default; operators add their own
//! networks (`--backend-deny-networks`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One network in CIDR notation, for example `169.254.0.0/16` or `fe80::/10`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    address: IpAddr,
    prefix: u8,
}

impl Network {
    /// Tells whether `address` lies in this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.address, address.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(address)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(network) & mask == u32::from(address) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(network) & mask == u128::from(address) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Network {
    type Err = String;

    fn from_str(text: &str) -> Result<Network, String> {
        let (address, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a network like 10.0.0.0/8 or fe80::/10"))?;
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("{address:?} in {text:?} is not an IP address"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|prefix| *prefix <= max)
            .ok_or_else(|| format!("the prefix length in {text:?} must be 0 to {max}"))?;
        Ok(Network { address, prefix })
    }
}

impl fmt::Display for Network {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}/{}", self.address, self.prefix)
    }
}

/// The networks denied by default: IPv4 and IPv6 link-local.
pub const DEFAULT_DENIED: &str = "169.254.0.0/16,fe80::/10";

/// The networks backends may not point at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    denied: Vec<Network>,
}

impl AddressPolicy {
    /// Creates a policy denying `denied`.
    pub fn new(denied: Vec<Network>) -> AddressPolicy {
        AddressPolicy { denied }
    }

    /// Returns the denied network that holds `address`, if any.
    pub fn denies(&self, address: &str) -> Option<Network> {
        let address: IpAddr = address.parse().ok()?;
        self.denied
            .iter()
            .copied()
            .find(|network| network.contains(address))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(networks: &str) -> AddressPolicy {
        AddressPolicy::new(networks.split(',').map(|n| n.parse().unwrap()).collect())
    }

    #[test]
    fn link_local_is_denied_by_default_and_other_addresses_are_not() {
        let policy = policy(DEFAULT_DENIED);
        assert_eq!(
            policy.denies("169.254.169.254").map(|n| n.to_string()),
            Some("169.254.0.0/16".to_owned())
        );
        assert!(policy.denies("fe80::1").is_some());
        assert!(policy.denies("::ffff:169.254.1.1").is_some(), "mapped IPv4");
        assert_eq!(policy.denies("169.255.0.1"), None);
        assert_eq!(policy.denies("10.0.0.1"), None);
        assert_eq!(policy.denies("fec0::1"), None);
    }

    #[test]
    fn operators_add_networks_and_bad_ones_are_refused() {
        let policy = policy("10.0.0.0/8,0.0.0.0/0");
        assert!(policy.denies("192.0.2.1").is_some(), "/0 holds everything");
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("10.0.0.0".parse::<Network>().is_err());
        assert!("ten/8".parse::<Network>().is_err());
    }
}
