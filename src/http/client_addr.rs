//! Who the client is: the TCP peer's address, or, when the peer is a reverse proxy
//! listed in `server.trusted_proxies`, the address that proxy forwarded in
//! `X-Forwarded-For`. Every per-address decision (sign-in and sign-up limits, the
//! WebSocket and SSE per-address connection budget, the address the admin API shows)
//! uses this one answer.
//!
//! `X-Forwarded-For` is a list that every proxy appends its peer to, so only its
//! right end can be believed: walking from the right, addresses of trusted proxies
//! are skipped and the first other address is the client. A client cannot spoof its
//! way past that (whatever it writes goes to the left of what the trusted proxy
//! appends). A header that does not parse is ignored: the peer (the proxy) is the
//! client then, which errs towards a stricter limit, never a looser one.

use std::{fmt, net::IpAddr, str::FromStr};

use actix_web::http::header::HeaderMap;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The header reverse proxies append the address of their peer to.
pub const FORWARDED_FOR: &str = "x-forwarded-for";

/// Most `X-Forwarded-For` entries looked at (a longer chain of trusted proxies than
/// this is not a real deployment).
const MAX_HOPS: usize = 16;

/// One `server.trusted_proxies` entry: an address (`10.0.0.7`, `::1`) or a network
/// (`10.0.0.0/8`, `fd00::/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyNet(IpNet);

impl ProxyNet {
    fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&canonical(ip))
    }
}

impl FromStr for ProxyNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(Self(net.trunc()));
        }
        s.parse::<IpAddr>()
            .map(|ip| Self(IpNet::from(canonical(ip))))
            .map_err(|_| format!("{s:?} is neither an IP address nor a network like 10.0.0.0/8"))
    }
}

impl fmt::Display for ProxyNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for ProxyNet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ProxyNet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`, what a dual-stack socket reports)
/// compare as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The client's address: `peer` unless `peer` is one of `trusted`, in which case the
/// right-most address of `X-Forwarded-For` that is not a trusted proxy (or the
/// left-most one, when every hop is trusted).
pub fn client_ip(
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    trusted: &[ProxyNet],
) -> Option<IpAddr> {
    let peer = peer.map(canonical);
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    let Some(proxy) = peer.filter(|ip| is_trusted(*ip)) else {
        return peer;
    };
    let mut hops: Vec<IpAddr> = Vec::new();
    for value in headers.get_all(FORWARDED_FOR) {
        let Ok(value) = value.to_str() else {
            return Some(proxy);
        };
        for entry in value.split(',') {
            let Some(ip) = parse_hop(entry) else {
                return Some(proxy);
            };
            hops.push(canonical(ip));
        }
    }
    if hops.is_empty() {
        return Some(proxy);
    }
    let window = &hops[hops.len().saturating_sub(MAX_HOPS)..];
    let client = window
        .iter()
        .rev()
        .find(|ip| !is_trusted(**ip))
        .or(window.first())
        .copied();
    client.or(Some(proxy))
}

/// One `X-Forwarded-For` entry: an address, optionally with a port
/// (`192.0.2.1:4711`, `[2001:db8::1]:4711`).
fn parse_hop(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse() {
        return Some(ip);
    }
    if let Some(rest) = entry.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (host, port) = entry.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use actix_web::http::header::{HeaderName, HeaderValue};

    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(
                HeaderName::from_static(FORWARDED_FOR),
                HeaderValue::from_str(v).expect("header value"),
            );
        }
        map
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn nets(list: &[&str]) -> Vec<ProxyNet> {
        list.iter().map(|s| s.parse().expect("net")).collect()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let trusted = nets(&["10.0.0.0/8"]);
        let got = client_ip(Some(ip("192.0.2.7")), &headers(&["203.0.113.1"]), &trusted);
        assert_eq!(got, Some(ip("192.0.2.7")));
        assert_eq!(
            client_ip(Some(ip("10.0.0.1")), &headers(&[]), &[]),
            Some(ip("10.0.0.1"))
        );
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_client() {
        let trusted = nets(&["10.0.0.0/8", "127.0.0.1"]);
        // A client's own spoofed entry sits to the left of what nginx appended.
        let h = headers(&["203.0.113.9, 198.51.100.4", "10.1.2.3"]);
        assert_eq!(
            client_ip(Some(ip("127.0.0.1")), &h, &trusted),
            Some(ip("198.51.100.4"))
        );
        // Every hop trusted: the left-most one.
        let h = headers(&["10.9.9.9, 10.1.1.1"]);
        assert_eq!(
            client_ip(Some(ip("10.0.0.2")), &h, &trusted),
            Some(ip("10.9.9.9"))
        );
    }

    #[test]
    fn a_malformed_header_leaves_the_proxy_as_the_client() {
        let trusted = nets(&["127.0.0.1/32"]);
        for bad in ["not-an-ip", "203.0.113.1, ", "unknown"] {
            let got = client_ip(Some(ip("127.0.0.1")), &headers(&[bad]), &trusted);
            assert_eq!(got, Some(ip("127.0.0.1")), "{bad}");
        }
        let got = client_ip(Some(ip("127.0.0.1")), &headers(&[]), &trusted);
        assert_eq!(got, Some(ip("127.0.0.1")));
    }

    #[test]
    fn ports_brackets_and_mapped_addresses_are_understood() {
        let trusted = nets(&["::1", "10.0.0.0/8"]);
        let h = headers(&["192.0.2.1:4711"]);
        assert_eq!(
            client_ip(Some(ip("::1")), &h, &trusted),
            Some(ip("192.0.2.1"))
        );
        let h = headers(&["[2001:db8::1]:4711"]);
        assert_eq!(
            client_ip(Some(ip("::1")), &h, &trusted),
            Some(ip("2001:db8::1"))
        );
        let h = headers(&["192.0.2.2"]);
        assert_eq!(
            client_ip(Some(ip("::ffff:10.0.0.5")), &h, &trusted),
            Some(ip("192.0.2.2"))
        );
    }

    #[test]
    fn entries_parse_as_addresses_or_networks() {
        assert_eq!(
            "10.0.0.7".parse::<ProxyNet>().expect("ip").to_string(),
            "10.0.0.7/32"
        );
        assert_eq!(
            "10.1.2.3/8".parse::<ProxyNet>().expect("net").to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "::1".parse::<ProxyNet>().expect("v6").to_string(),
            "::1/128"
        );
        assert!("example.com".parse::<ProxyNet>().is_err());
        assert!("10.0.0.0/33".parse::<ProxyNet>().is_err());
    }
}
