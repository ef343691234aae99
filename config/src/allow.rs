//! Export allow-lists: which clients may see and use an export.
//!
//! A rule is one of
//! - an IP address (`192.0.2.7`, `::1`) or a CIDR block (`10.0.0.0/8`,
//!   `fd00::/8`) matched against a TCP client's address (IPv4-mapped IPv6
//!   peers match IPv4 rules);
//! - `unix`: any client on the unix socket;
//! - `cert:NAME`: a client that completed TLS with a certificate, verified
//!   against `tls.ca`, whose subject CN or a DNS/email SAN equals `NAME`.
//!
//! An empty list allows everyone; otherwise a client matching any rule is
//! allowed.

use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowRule {
    Net { addr: IpAddr, prefix: u8 },
    Unix,
    Cert(String),
}

/// What the gateway knows about a connected client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// TCP peer address; `None` on the unix socket.
    pub ip: Option<IpAddr>,
    /// Identities from a verified TLS client certificate (CN and SANs);
    /// empty without TLS or without a client certificate.
    pub cert_names: Vec<String>,
}

impl Peer {
    /// Does this client pass `rules` (empty = everyone)?
    pub fn allowed_by(&self, rules: &[AllowRule]) -> bool {
        rules.is_empty() || rules.iter().any(|r| r.matches(self))
    }
}

impl AllowRule {
    pub fn matches(&self, peer: &Peer) -> bool {
        match self {
            AllowRule::Unix => peer.ip.is_none(),
            AllowRule::Cert(name) => peer.cert_names.iter().any(|n| n == name),
            AllowRule::Net { addr, prefix } => match peer.ip {
                Some(ip) => net_contains(*addr, *prefix, canonical(ip)),
                None => false,
            },
        }
    }

    /// Rules that can only match a TLS client.
    pub fn needs_tls(&self) -> bool {
        matches!(self, AllowRule::Cert(_))
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn net_contains(net: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

impl std::str::FromStr for AllowRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "unix" {
            return Ok(AllowRule::Unix);
        }
        if let Some(name) = s.strip_prefix("cert:") {
            if name.is_empty() {
                return Err("`cert:` needs a name (certificate CN or SAN)".into());
            }
            return Ok(AllowRule::Cert(name.to_string()));
        }
        let (addr_s, prefix_s) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr_s.parse().map_err(|_| {
            format!("{s:?} is not an IP address, CIDR block, `unix` or `cert:NAME`")
        })?;
        let addr = canonical(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_s {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("prefix length {p:?} must be 0..={max}"))?,
        };
        Ok(AllowRule::Net { addr, prefix })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(ip: &str) -> Peer {
        Peer {
            ip: Some(ip.parse().unwrap()),
            cert_names: vec![],
        }
    }

    #[test]
    fn cidr_matching() {
        let r: AllowRule = "10.1.0.0/16".parse().unwrap();
        assert!(r.matches(&tcp("10.1.200.3")));
        assert!(!r.matches(&tcp("10.2.0.1")));
        assert!(r.matches(&tcp("::ffff:10.1.0.9")), "v4-mapped peer");
        let all: AllowRule = "0.0.0.0/0".parse().unwrap();
        assert!(all.matches(&tcp("203.0.113.1")));
        let one: AllowRule = "127.0.0.1".parse().unwrap();
        assert!(one.matches(&tcp("127.0.0.1")));
        assert!(!one.matches(&tcp("127.0.0.2")));
        let v6: AllowRule = "fd00::/8".parse().unwrap();
        assert!(v6.matches(&tcp("fd12::1")));
        assert!(!v6.matches(&tcp("fe80::1")));
        assert!(!v6.matches(&Peer::default()), "unix peer has no IP");
    }

    #[test]
    fn unix_and_cert_rules() {
        let unix = Peer::default();
        assert!(AllowRule::Unix.matches(&unix));
        assert!(!AllowRule::Unix.matches(&tcp("127.0.0.1")));
        let c: AllowRule = "cert:vm7".parse().unwrap();
        let mut p = tcp("127.0.0.1");
        assert!(!c.matches(&p));
        p.cert_names = vec!["other".into(), "vm7".into()];
        assert!(c.matches(&p));
        assert!(c.needs_tls());
    }

    #[test]
    fn empty_list_allows_everyone() {
        assert!(tcp("198.51.100.1").allowed_by(&[]));
        assert!(!tcp("198.51.100.1").allowed_by(&[AllowRule::Unix]));
    }

    #[test]
    fn bad_rules() {
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "host.example",
            "cert:",
            "10.0.0.0/x",
        ] {
            assert!(bad.parse::<AllowRule>().is_err(), "{bad:?} accepted");
        }
    }
}
