//! Targets (`static:`, `dns:`) and the [`Resolve`] trait that turns them into addresses.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
};

use crate::Error;

/// The future a [`Resolve`] returns.
pub type ResolveFuture<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;

/// Answers where a target's replicas are right now. A channel asks again every refresh interval
/// and sends new calls only to the latest answer.
///
/// An `Err` keeps the previous answer (a DNS hiccup must not empty the pool); an `Ok` is taken
/// as the whole truth, including an empty one. Implement it to drive discovery in tests.
pub trait Resolve: Send + Sync + 'static {
    /// The current addresses, in any order, duplicates allowed.
    fn resolve(&self) -> ResolveFuture<'_>;
}

/// A parsed target string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) hosts: Vec<(String, u16)>,
    /// `dns:` (a headless Service name) rather than a fixed list.
    pub(crate) dns: bool,
}

impl Target {
    /// `static:host:port[,host:port...]`, `dns:name:port` (also `dns:///name:port`) or a bare
    /// `host:port` (read as `static:`). Hosts may be names, IPv4 or bracketed IPv6 addresses.
    pub(crate) fn parse(target: &str) -> Result<Self, Error> {
        let invalid = |reason| Error::InvalidTarget {
            target: target.to_owned(),
            reason,
        };
        let (dns, list) = if let Some(rest) = target.strip_prefix("dns:") {
            (true, rest.strip_prefix("///").unwrap_or(rest))
        } else if let Some(rest) = target.strip_prefix("static:") {
            (false, rest)
        } else {
            (false, target)
        };
        let mut hosts = Vec::new();
        for entry in list.split(',').map(str::trim) {
            let (host, port) = entry
                .rsplit_once(':')
                .ok_or_else(|| invalid("expected host:port"))?;
            let port: u16 = port
                .parse()
                .map_err(|_| invalid("the port is not a number from 0 to 65535"))?;
            let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
                Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_ok() => v6,
                Some(_) => return Err(invalid("brackets hold an IPv6 address")),
                None if host.contains(':') => {
                    return Err(invalid("IPv6 addresses go in brackets: [::1]:port"));
                }
                None => host,
            };
            if host.is_empty() || host.contains(['/', ' ', '[', ']']) {
                return Err(invalid("expected host:port"));
            }
            hosts.push((host.to_owned(), port));
        }
        if dns && hosts.len() != 1 {
            return Err(invalid("dns: takes exactly one name:port"));
        }
        Ok(Self { hosts, dns })
    }

    /// The `:authority` to send: the name for `dns:`, none (each endpoint's address) otherwise.
    pub(crate) fn authority(&self) -> Option<String> {
        match (self.dns, self.hosts.first()) {
            (true, Some((host, port))) => Some(format!("{host}:{port}")),
            _ => None,
        }
    }

    /// The name to give TLS. Certificates are verified by SPIFFE id, not by name, so this only
    /// needs to be a valid name.
    pub(crate) fn server_name(&self) -> String {
        self.hosts
            .first()
            .map_or_else(|| "tessera.invalid".to_owned(), |(host, _)| host.clone())
    }

    pub(crate) fn into_resolver(self) -> HostsResolver {
        HostsResolver { hosts: self.hosts }
    }
}

/// Resolves fixed `host:port` entries; names go to the system resolver on every refresh (a
/// `dns:` target is one such entry), literal addresses are answered directly.
#[derive(Debug)]
pub(crate) struct HostsResolver {
    hosts: Vec<(String, u16)>,
}

impl Resolve for HostsResolver {
    fn resolve(&self) -> ResolveFuture<'_> {
        Box::pin(async move {
            let mut addrs = Vec::with_capacity(self.hosts.len());
            let mut last_error = None;
            for (host, port) in &self.hosts {
                if let Ok(ip) = host.parse::<IpAddr>() {
                    addrs.push(SocketAddr::new(ip, *port));
                    continue;
                }
                match tokio::net::lookup_host((host.as_str(), *port)).await {
                    Ok(found) => addrs.extend(found),
                    Err(e) => last_error = Some(e),
                }
            }
            match last_error {
                // Some names answered: use them rather than nothing.
                Some(e) if addrs.is_empty() => Err(e),
                _ => Ok(addrs),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn parses_the_target_forms() {
        let t = Target::parse("static:10.0.0.1:80,[::1]:81, a.b:82").unwrap();
        assert!(!t.dns);
        assert_eq!(
            t.hosts,
            vec![
                ("10.0.0.1".to_owned(), 80),
                ("::1".to_owned(), 81),
                ("a.b".to_owned(), 82)
            ]
        );
        assert_eq!(t.authority(), None);
        let t = Target::parse("dns:posts.tessera.svc:8443").unwrap();
        assert!(t.dns);
        assert_eq!(t.authority().as_deref(), Some("posts.tessera.svc:8443"));
        assert_eq!(t.server_name(), "posts.tessera.svc");
        assert_eq!(
            Target::parse("dns:///posts:1").unwrap(),
            Target::parse("dns:posts:1").unwrap()
        );
        assert_eq!(
            Target::parse("127.0.0.1:5").unwrap(),
            Target::parse("static:127.0.0.1:5").unwrap()
        );
        for bad in [
            "",
            "dns:",
            "dns:a:1,b:2",
            "static:a",
            "a:99999",
            "::1:80",
            "static:a:1,",
            "http://a:1",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[tokio::test]
    async fn resolves_literals_and_names() {
        let addrs = Target::parse("static:127.0.0.1:1,localhost:2")
            .unwrap()
            .into_resolver()
            .resolve()
            .await
            .unwrap();
        assert_eq!(addrs[0], "127.0.0.1:1".parse().unwrap());
        assert!(
            addrs[1..]
                .iter()
                .all(|a| a.port() == 2 && a.ip().is_loopback())
        );
        assert!(addrs.len() >= 2);
    }
}
