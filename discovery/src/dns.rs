//! [`DnsDiscovery`]: peers from DNS A/AAAA or SRV records.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::peer::normalize;
use crate::{Discovery, Error, Peer, Result};

/// At most this many SRV records of one answer are used.
const MAX_SRV_RECORDS: usize = 1024;

/// How many SRV targets are resolved at the same time.
const TARGET_CONCURRENCY: usize = 16;

/// What to ask DNS for.
#[derive(Debug, Clone)]
enum Query {
    /// A and AAAA records of `name`, every address with `port`.
    Addrs { name: String, port: u16 },
    /// SRV records of `name`; targets resolved to addresses, ports from the records.
    Srv { name: String },
}

/// A discovery backend asking DNS for the cluster's nodes.
///
/// Two kinds of query:
///
/// - [`DnsDiscovery::a_records`]: the A and AAAA records of one name, each address with the
///   same port. This is the Kubernetes headless-service pattern, where a service name
///   resolves to the addresses of all its ready pods.
/// - [`DnsDiscovery::srv`]: the SRV records of one name (such as `_cets._udp.example.com`);
///   each target is resolved to its addresses (A and AAAA) and takes the port of its record.
///   Priority and weight are ignored: every target is a peer.
///
/// Names are taken as fully qualified (a trailing dot is added if missing), so the search
/// domains of `resolv.conf` never apply. The nameservers are those of the system
/// (`/etc/resolv.conf`) unless one is set with [`nameserver`](DnsDiscovery::nameserver);
/// `/etc/hosts` is not consulted. Caching is off: every
/// [`get_nodes`](Discovery::get_nodes) call queries the nameserver, so a node that appears
/// in DNS is seen by the next poll.
///
/// Errors: a name that does not exist (NXDOMAIN), a failed query (SERVFAIL, REFUSED, ...) or
/// a malformed name give [`Error::Dns`]; a call that takes longer than the
/// [`timeout`](DnsDiscovery::timeout) gives [`Error::Timeout`]. A name that exists but has no
/// records of the type asked for gives an empty list. For SRV, a target that does not
/// resolve is logged and skipped, unless no target resolves at all, in which case the
/// error of the first one is returned.
///
/// The result is sorted and deduplicated; the peers carry no names.
///
/// ```no_run
/// # async fn demo() -> cets_discovery::Result<()> {
/// use std::time::Duration;
/// use cets_discovery::{Discovery, DnsDiscovery};
///
/// // Kubernetes headless service: every pod address, port 4370.
/// let mut pods = DnsDiscovery::a_records("cets.default.svc.cluster.local", 4370)
///     .timeout(Duration::from_secs(2));
/// let peers = pods.get_nodes().await?;
///
/// // SRV records, asking a given nameserver.
/// let mut srv = DnsDiscovery::srv("_cets._udp.example.com")
///     .nameserver("10.0.0.53:53".parse().unwrap());
/// let peers = srv.get_nodes().await?;
/// # Ok(())
/// # }
/// ```
pub struct DnsDiscovery {
    query: Query,
    nameserver: Option<SocketAddr>,
    timeout: Duration,
    /// Built on the first call (reading the system configuration can fail, and a
    /// constructor does not return errors), then reused; the builder methods reset it.
    resolver: Option<TokioResolver>,
}

impl fmt::Debug for DnsDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsDiscovery")
            .field("query", &self.query)
            .field("nameserver", &self.nameserver)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl DnsDiscovery {
    /// The default time budget of one [`get_nodes`](Discovery::get_nodes) call: 5 s.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Peers at every A and AAAA address of `name`, all with `port`.
    pub fn a_records(name: impl Into<String>, port: u16) -> Self {
        Self::with_query(Query::Addrs {
            name: fqdn(name.into()),
            port,
        })
    }

    /// Peers from the SRV records of `name`: each target resolved to its addresses, with the
    /// port of its record.
    pub fn srv(name: impl Into<String>) -> Self {
        Self::with_query(Query::Srv {
            name: fqdn(name.into()),
        })
    }

    fn with_query(query: Query) -> Self {
        DnsDiscovery {
            query,
            nameserver: None,
            timeout: Self::DEFAULT_TIMEOUT,
            resolver: None,
        }
    }

    /// Asks this nameserver (over UDP, and TCP for truncated answers, at the given port)
    /// instead of those of the system configuration.
    pub fn nameserver(mut self, addr: SocketAddr) -> Self {
        self.nameserver = Some(addr);
        self.resolver = None;
        self
    }

    /// The time budget of one [`get_nodes`](Discovery::get_nodes) call, all of its queries
    /// together (default [`DEFAULT_TIMEOUT`](Self::DEFAULT_TIMEOUT)). Past it the call
    /// returns [`Error::Timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self.resolver = None;
        self
    }

    /// The fully qualified name this backend queries.
    pub fn name(&self) -> &str {
        match &self.query {
            Query::Addrs { name, .. } | Query::Srv { name } => name,
        }
    }

    fn build_resolver(&self) -> Result<TokioResolver> {
        let mut builder = match self.nameserver {
            Some(addr) => {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for conn in &mut ns.connections {
                    conn.port = addr.port();
                }
                let config = ResolverConfig::from_parts(None, vec![], vec![ns]);
                Resolver::builder_with_config(config, TokioRuntimeProvider::default())
            }
            None => TokioResolver::builder_tokio().map_err(|e| {
                Error::Dns(format!("cannot read the system DNS configuration: {e}"))
            })?,
        };
        let opts = builder.options_mut();
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        // Polling discovery must see changes: no cache, and zero TTLs for anything that
        // would still be stored.
        opts.cache_size = 0;
        opts.positive_max_ttl = Some(Duration::ZERO);
        opts.negative_max_ttl = Some(Duration::ZERO);
        opts.use_hosts_file = ResolveHosts::Never;
        opts.timeout = self.timeout;
        opts.attempts = 1;
        builder
            .build()
            .map_err(|e| Error::Dns(format!("cannot build the DNS resolver: {e}")))
    }

    async fn lookup(resolver: TokioResolver, query: Query) -> Result<Vec<Peer>> {
        let mut peers = match query {
            Query::Addrs { name, port } => lookup_addrs(&resolver, &name)
                .await?
                .into_iter()
                .map(|ip| Peer::new(SocketAddr::new(ip, port)))
                .collect(),
            Query::Srv { name } => lookup_srv(&resolver, &name).await?,
        };
        normalize(&mut peers);
        Ok(peers)
    }
}

#[async_trait::async_trait]
impl Discovery for DnsDiscovery {
    async fn get_nodes(&mut self) -> Result<Vec<Peer>> {
        let resolver = match &self.resolver {
            Some(resolver) => resolver.clone(),
            None => {
                let resolver = self.build_resolver()?;
                self.resolver = Some(resolver.clone());
                resolver
            }
        };
        // Belt and braces: the cache is off, but clear anything that could have slipped in.
        resolver.clear_cache();
        let query = self.query.clone();
        match tokio::time::timeout(self.timeout, Self::lookup(resolver, query)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout),
        }
    }
}

/// Appends the root dot to make `name` fully qualified.
fn fqdn(name: String) -> String {
    let mut name = name.trim().to_owned();
    if !name.ends_with('.') {
        name.push('.');
    }
    name
}

/// A and AAAA records of `name`. An existing name without address records is `Ok(empty)`.
async fn lookup_addrs(resolver: &TokioResolver, name: &str) -> Result<Vec<IpAddr>> {
    check_name(name)?;
    match resolver.lookup_ip(name).await {
        Ok(found) => Ok(found.iter().collect()),
        Err(err) => empty_or_error(err, name, "A/AAAA"),
    }
}

/// SRV records of `name`, targets resolved.
async fn lookup_srv(resolver: &TokioResolver, name: &str) -> Result<Vec<Peer>> {
    check_name(name)?;
    let lookup = match resolver.srv_lookup(name).await {
        Ok(lookup) => lookup,
        Err(err) => return empty_or_error(err, name, "SRV"),
    };
    let mut targets: Vec<(String, u16)> = lookup
        .answers()
        .iter()
        .filter_map(|record| match &record.data {
            RData::SRV(srv) => Some(srv),
            _ => None,
        })
        // A target of "." means "no such service here" (RFC 2782).
        .filter(|srv| !srv.target.is_root())
        .take(MAX_SRV_RECORDS)
        .map(|srv| {
            let mut target = srv.target.clone();
            target.set_fqdn(true);
            (target.to_ascii(), srv.port)
        })
        .collect();
    targets.sort();
    targets.dedup();
    if targets.is_empty() {
        return Ok(Vec::new());
    }

    let mut peers = Vec::new();
    let mut first_err = None;
    let mut pending = targets.into_iter();
    let mut set = JoinSet::new();
    loop {
        while set.len() < TARGET_CONCURRENCY {
            let Some((target, port)) = pending.next() else {
                break;
            };
            let resolver = resolver.clone();
            // In the caller's span (the node's discovery task), as every task cets spawns.
            set.spawn(
                async move {
                    let res = lookup_addrs(&resolver, &target).await;
                    (target, port, res)
                }
                .in_current_span(),
            );
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        match joined {
            Ok((_, port, Ok(ips))) => {
                peers.extend(
                    ips.into_iter()
                        .map(|ip| Peer::new(SocketAddr::new(ip, port))),
                );
            }
            Ok((target, _, Err(err))) => {
                tracing::warn!(srv = name, %target, %err, "skipping SRV target that does not resolve");
                first_err.get_or_insert(err);
            }
            Err(err) => tracing::warn!(srv = name, %err, "SRV target resolution task failed"),
        }
    }
    if peers.is_empty() {
        if let Some(err) = first_err {
            return Err(err);
        }
    }
    Ok(peers)
}

/// Rejects names the resolver would refuse, with a clear message.
fn check_name(name: &str) -> Result<()> {
    if name == "." {
        return Err(Error::Dns("empty DNS name".into()));
    }
    Ok(())
}

/// Maps a resolver error: "no records of this type" is an empty answer, everything else
/// (NXDOMAIN included) an error.
fn empty_or_error<T>(err: NetError, name: &str, kind: &str) -> Result<Vec<T>> {
    if err.is_nx_domain() {
        return Err(Error::Dns(format!("{name} does not exist (NXDOMAIN)")));
    }
    if err.is_no_records_found() {
        return Ok(Vec::new());
    }
    if matches!(err, NetError::Timeout) {
        return Err(Error::Timeout);
    }
    Err(Error::Dns(format!("{kind} lookup of {name} failed: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_made_fully_qualified() {
        assert_eq!(fqdn("a.example".into()), "a.example.");
        assert_eq!(fqdn("a.example.".into()), "a.example.");
        assert_eq!(fqdn(" a.example ".into()), "a.example.");
        assert_eq!(
            DnsDiscovery::srv("_x._udp.example").name(),
            "_x._udp.example."
        );
    }

    #[tokio::test]
    async fn empty_name_is_an_error() {
        let mut d = DnsDiscovery::a_records("", 1).nameserver("127.0.0.1:9".parse().unwrap());
        assert!(matches!(d.get_nodes().await, Err(Error::Dns(_))));
    }
}
