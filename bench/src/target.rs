//! The target server: loopback addresses only.

use std::net::{IpAddr, SocketAddr};

use anyhow::{anyhow, bail, ensure, Context as _, Result};

/// Resolves `server` (`HOST:PORT`) to one socket address, refusing anything that is
/// not loopback: IPv4 127.0.0.0/8, IPv6 ::1, or `localhost` when every address it
/// resolves to is one of those. No other host name is looked up at all.
pub(crate) async fn resolve_loopback(server: &str) -> Result<SocketAddr> {
    let (host, port) = server
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("--server must be HOST:PORT, got {server:?}"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("bad port in --server {server:?}"))?;
    let candidates: Vec<SocketAddr> = if host.eq_ignore_ascii_case("localhost") {
        tokio::net::lookup_host(("localhost", port))
            .await
            .context("resolve localhost")?
            .collect()
    } else {
        let literal = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let ip: IpAddr = literal.parse().map_err(|_| {
            anyhow!("--server {server:?}: the host must be a loopback IP address or localhost")
        })?;
        vec![SocketAddr::new(ip, port)]
    };
    ensure!(!candidates.is_empty(), "{server:?} resolves to nothing");
    if let Some(outside) = candidates.iter().find(|a| !a.ip().is_loopback()) {
        bail!(
            "refusing {server:?}: {} is not a loopback address; the bench only targets \
             127.0.0.0/8, ::1 or localhost",
            outside.ip()
        );
    }
    let chosen = candidates
        .iter()
        .find(|a| a.is_ipv4())
        .unwrap_or(&candidates[0]);
    Ok(*chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_loopback_targets_are_accepted() {
        for ok in [
            "127.0.0.1:8080",
            "127.1.2.3:1",
            "[::1]:9000",
            "localhost:8080",
        ] {
            let addr = resolve_loopback(ok)
                .await
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert!(addr.ip().is_loopback(), "{ok} → {addr}");
        }
        for refused in [
            "10.0.0.1:8080",
            "192.168.1.1:80",
            "8.8.8.8:53",
            "0.0.0.0:8080",
            "[::]:8080",
            "[::ffff:10.0.0.1]:80",
            "example.com:80",
            "127.0.0.1.nip.io:80",
            "127.0.0.1",
            "127.0.0.1:http",
        ] {
            assert!(
                resolve_loopback(refused).await.is_err(),
                "{refused} must be refused"
            );
        }
    }
}
