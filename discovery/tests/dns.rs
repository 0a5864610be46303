//! DnsDiscovery against a real DNS server (hickory-server) running in the test process on
//! 127.0.0.1, serving a zone whose records the tests change at run time.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cets_discovery::{Discovery, DnsDiscovery, Error, Peer};
use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV, TXT};
use hickory_server::proto::rr::{Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use hickory_server::Server;
use tokio::net::UdpSocket;

/// Long TTLs, so that any caching in the resolver would show up as a stale answer.
const TTL: u32 = 3600;

/// A bound on every test's DNS calls, well under the per-test budget.
const TIMEOUT: Duration = Duration::from_secs(1);

struct TestDns {
    addr: SocketAddr,
    zone: Arc<InMemoryZoneHandler>,
    serial: u32,
    _server: Server<Catalog>,
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn a(owner: &str, ip: [u8; 4]) -> Record {
    Record::from_rdata(
        name(owner),
        TTL,
        RData::A(A::from(std::net::Ipv4Addr::from(ip))),
    )
}

fn aaaa(owner: &str, ip: &str) -> Record {
    let ip: std::net::Ipv6Addr = ip.parse().unwrap();
    Record::from_rdata(name(owner), TTL, RData::AAAA(AAAA::from(ip)))
}

fn srv(owner: &str, port: u16, target: &str) -> Record {
    Record::from_rdata(
        name(owner),
        TTL,
        RData::SRV(SRV::new(0, 10, port, name(target))),
    )
}

impl TestDns {
    /// Serves `cluster.test.` with:
    /// - `nodes`: A 127.0.0.1, 127.0.0.2; AAAA ::1
    /// - `n1`: A 127.0.0.11; `n2`: A 127.0.0.12, AAAA ::12
    /// - `_cets._udp`: SRV -> n1:4001, n2:4002
    /// - `text-only`: TXT (a name with no address records)
    /// - `_dangling._udp`: SRV -> gone.cluster.test (which does not exist)
    async fn start() -> TestDns {
        let origin = name("cluster.test.");
        let mut zone =
            InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        let soa = SOA::new(
            name("ns.cluster.test."),
            name("admin.cluster.test."),
            1,
            3600,
            600,
            86400,
            TTL,
        );
        let records = vec![
            Record::from_rdata(origin.clone(), TTL, RData::SOA(soa)),
            a("nodes.cluster.test.", [127, 0, 0, 1]),
            a("nodes.cluster.test.", [127, 0, 0, 2]),
            aaaa("nodes.cluster.test.", "::1"),
            a("n1.cluster.test.", [127, 0, 0, 11]),
            a("n2.cluster.test.", [127, 0, 0, 12]),
            aaaa("n2.cluster.test.", "::12"),
            srv("_cets._udp.cluster.test.", 4001, "n1.cluster.test."),
            srv("_cets._udp.cluster.test.", 4002, "n2.cluster.test."),
            Record::from_rdata(
                name("text-only.cluster.test."),
                TTL,
                RData::TXT(TXT::new(vec!["hello".into()])),
            ),
            srv("_dangling._udp.cluster.test.", 4001, "gone.cluster.test."),
        ];
        for record in records {
            assert!(zone.upsert_mut(record, 1));
        }
        let zone = Arc::new(zone);
        let mut catalog = Catalog::new();
        catalog.upsert(origin.into(), vec![zone.clone() as Arc<dyn ZoneHandler>]);

        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let mut server = Server::new(catalog);
        server.register_socket(socket);
        TestDns {
            addr,
            zone,
            serial: 1,
            _server: server,
        }
    }

    async fn add(&mut self, record: Record) {
        self.serial += 1;
        assert!(self.zone.upsert(record, self.serial).await);
    }

    fn a_records(&self, owner: &str, port: u16) -> DnsDiscovery {
        DnsDiscovery::a_records(owner, port)
            .nameserver(self.addr)
            .timeout(TIMEOUT)
    }

    fn srv(&self, owner: &str) -> DnsDiscovery {
        DnsDiscovery::srv(owner)
            .nameserver(self.addr)
            .timeout(TIMEOUT)
    }
}

fn peers(addrs: &[&str]) -> Vec<Peer> {
    let mut v: Vec<Peer> = addrs
        .iter()
        .map(|a| Peer::new(a.parse().unwrap()))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_and_aaaa_records_with_port() {
    let dns = TestDns::start().await;
    // With and without the trailing dot.
    for owner in ["nodes.cluster.test", "nodes.cluster.test."] {
        let got = dns.a_records(owner, 4370).get_nodes().await.unwrap();
        assert_eq!(
            got,
            peers(&["127.0.0.1:4370", "127.0.0.2:4370", "[::1]:4370"]),
            "{owner}"
        );
    }
}

#[tokio::test]
async fn srv_records_resolve_targets_with_their_ports() {
    let dns = TestDns::start().await;
    let got = dns
        .srv("_cets._udp.cluster.test")
        .get_nodes()
        .await
        .unwrap();
    assert_eq!(
        got,
        peers(&["127.0.0.11:4001", "127.0.0.12:4002", "[::12]:4002"])
    );
}

#[tokio::test]
async fn records_added_at_run_time_are_seen_by_the_next_poll() {
    let mut dns = TestDns::start().await;
    let mut by_addr = dns.a_records("nodes.cluster.test", 4370);
    let mut by_srv = dns.srv("_cets._udp.cluster.test");
    assert_eq!(by_addr.get_nodes().await.unwrap().len(), 3);
    assert_eq!(by_srv.get_nodes().await.unwrap().len(), 3);

    dns.add(a("nodes.cluster.test.", [127, 0, 0, 3])).await;
    dns.add(a("n3.cluster.test.", [127, 0, 0, 13])).await;
    dns.add(srv("_cets._udp.cluster.test.", 4003, "n3.cluster.test."))
        .await;

    assert_eq!(
        by_addr.get_nodes().await.unwrap(),
        peers(&[
            "127.0.0.1:4370",
            "127.0.0.2:4370",
            "127.0.0.3:4370",
            "[::1]:4370"
        ])
    );
    assert_eq!(
        by_srv.get_nodes().await.unwrap(),
        peers(&[
            "127.0.0.11:4001",
            "127.0.0.12:4002",
            "127.0.0.13:4003",
            "[::12]:4002"
        ])
    );

    // A new name appears: first NXDOMAIN, then found (no negative caching either).
    let mut late = dns.a_records("late.cluster.test", 1);
    assert!(matches!(late.get_nodes().await, Err(Error::Dns(_))));
    dns.add(a("late.cluster.test.", [127, 0, 0, 50])).await;
    assert_eq!(late.get_nodes().await.unwrap(), peers(&["127.0.0.50:1"]));
}

#[tokio::test]
async fn nxdomain_is_an_error() {
    let dns = TestDns::start().await;
    let err = dns
        .a_records("missing.cluster.test", 1)
        .get_nodes()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Dns(msg) if msg.contains("NXDOMAIN")),
        "{err:?}"
    );

    let err = dns
        .srv("_missing._udp.cluster.test")
        .get_nodes()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Dns(_)), "{err:?}");
}

#[tokio::test]
async fn name_outside_the_served_zone_is_an_error() {
    let dns = TestDns::start().await;
    // The server is not authoritative for it and does not recurse: REFUSED.
    let err = dns
        .a_records("nodes.elsewhere.test", 1)
        .get_nodes()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Dns(_)), "{err:?}");
}

#[tokio::test]
async fn existing_name_without_records_of_the_type_is_empty() {
    let dns = TestDns::start().await;
    let got = dns
        .a_records("text-only.cluster.test", 1)
        .get_nodes()
        .await
        .unwrap();
    assert_eq!(got, vec![]);
    let got = dns.srv("text-only.cluster.test").get_nodes().await.unwrap();
    assert_eq!(got, vec![]);
}

#[tokio::test]
async fn srv_with_only_dangling_targets_is_an_error_and_partial_is_ok() {
    let mut dns = TestDns::start().await;
    let mut d = dns.srv("_dangling._udp.cluster.test");
    assert!(matches!(d.get_nodes().await, Err(Error::Dns(_))));

    // One good target next to the dangling one: the good one is returned.
    dns.add(srv(
        "_dangling._udp.cluster.test.",
        4005,
        "n1.cluster.test.",
    ))
    .await;
    assert_eq!(d.get_nodes().await.unwrap(), peers(&["127.0.0.11:4005"]));
}

#[tokio::test]
async fn silent_nameserver_times_out() {
    // A UDP socket that is bound (so no ICMP port-unreachable) and never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let timeout = Duration::from_millis(300);

    for mut d in [
        DnsDiscovery::a_records("nodes.cluster.test", 1),
        DnsDiscovery::srv("_cets._udp.cluster.test"),
    ] {
        d = d.nameserver(addr).timeout(timeout);
        let start = Instant::now();
        let res = d.get_nodes().await;
        let took = start.elapsed();
        assert!(matches!(res, Err(Error::Timeout)), "{res:?}");
        assert!(took >= timeout, "returned too early: {took:?}");
        assert!(took < timeout * 3, "took {took:?}");
    }
    drop(silent);
}

#[tokio::test]
async fn a_boxed_backend_polls_the_same() {
    let dns = TestDns::start().await;
    let mut d: Box<dyn Discovery> = Box::new(dns.a_records("n2.cluster.test", 7));
    let want = vec![
        Peer::new(SocketAddr::new(IpAddr::from([127, 0, 0, 12]), 7)),
        Peer::new("[::12]:7".parse().unwrap()),
    ];
    assert_eq!(d.get_nodes().await.unwrap(), want);
    assert_eq!(d.get_nodes().await.unwrap(), want);
}
