//! Nodes that find each other through DNS: a real DNS server (hickory-server, in the test
//! process on 127.0.0.1) serves SRV and A records; adding a record makes a new node join.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cets::discovery::DnsDiscovery;
use cets::{Node, NodeConfig, Table, TableOptions};
use hickory_server::proto::rr::rdata::{A, SOA, SRV};
use hickory_server::proto::rr::{Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use hickory_server::Server;
use tokio::net::UdpSocket;

struct Dns {
    addr: SocketAddr,
    zone: Arc<InMemoryZoneHandler>,
    serial: u32,
    _server: Server<Catalog>,
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

impl Dns {
    async fn start() -> Dns {
        let origin = name("cluster.test.");
        let mut zone =
            InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        let soa = SOA::new(
            name("ns.cluster.test."),
            name("admin.cluster.test."),
            1,
            60,
            60,
            60,
            60,
        );
        assert!(zone.upsert_mut(Record::from_rdata(origin.clone(), 60, RData::SOA(soa)), 1));
        assert!(zone.upsert_mut(
            Record::from_rdata(
                name("host.cluster.test."),
                60,
                RData::A(A::from(Ipv4Addr::LOCALHOST))
            ),
            1
        ));
        let zone = Arc::new(zone);
        let mut catalog = Catalog::new();
        catalog.upsert(origin.into(), vec![zone.clone() as Arc<dyn ZoneHandler>]);
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let mut server = Server::new(catalog);
        server.register_socket(socket);
        Dns {
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

    async fn add_srv(&mut self, port: u16) {
        let rdata = RData::SRV(SRV::new(0, 10, port, name("host.cluster.test.")));
        self.add(Record::from_rdata(
            name("_cets._udp.cluster.test."),
            60,
            rdata,
        ))
        .await;
    }
}

async fn start(name: &str, listen: SocketAddr, discovery: DnsDiscovery) -> Node {
    Node::builder(name)
        .listen(listen)
        .cookie("dns")
        .config(NodeConfig::fast_failover())
        .discovery(discovery)
        .start()
        .await
        .unwrap()
}

async fn wait_len(t: &Table<String, u64>, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.len() != n {
        assert!(
            Instant::now() < deadline,
            "{} has {} records, expected {n}",
            t.name(),
            t.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_added_to_the_zone_make_nodes_join() {
    let mut dns = Dns::start().await;
    let ns = dns.addr;
    let srv = || {
        DnsDiscovery::srv("_cets._udp.cluster.test")
            .nameserver(ns)
            .timeout(Duration::from_millis(500))
    };
    let a = start("a", "127.0.0.1:0".parse().unwrap(), srv()).await;
    let b = start("b", "127.0.0.1:0".parse().unwrap(), srv()).await;
    let ta: Table<String, u64> = a.start("t", TableOptions::set()).await.unwrap();
    let tb: Table<String, u64> = b.start("t", TableOptions::set()).await.unwrap();
    ta.insert("from-a".into(), 1).await.unwrap();
    tb.insert("from-b".into(), 2).await.unwrap();
    // The name does not exist yet: discovery reports the error, nothing breaks.
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.status().await.discovery_error.is_none() {
        assert!(Instant::now() < deadline, "NXDOMAIN should be reported");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    dns.add_srv(a.local_addr().port()).await;
    dns.add_srv(b.local_addr().port()).await;
    wait_len(&ta, 2).await;
    wait_len(&tb, 2).await;
    // The node may have been joined through the other node's poll before its own next poll.
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.status().await.discovery_error.is_some() {
        assert!(
            Instant::now() < deadline,
            "the error should clear once the name resolves"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A third node appears in DNS later and catches up.
    let c = start("c", "127.0.0.1:0".parse().unwrap(), srv()).await;
    let tc: Table<String, u64> = c.start("t", TableOptions::set()).await.unwrap();
    dns.add_srv(c.local_addr().port()).await;
    c.wait_for_ready(Duration::from_secs(10)).await.unwrap();
    wait_len(&tc, 2).await;
    tc.insert("from-c".into(), 3).await.unwrap();
    assert_eq!(ta.get(&"from-c".to_string()), Some(3));
    for n in [a, b, c] {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_with_a_port_make_nodes_join() {
    // The Kubernetes headless-service pattern: one name, one A record per node, one port.
    let mut dns = Dns::start().await;
    let probe = std::net::UdpSocket::bind("127.0.0.21:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let ns = dns.addr;
    let disco = || {
        DnsDiscovery::a_records("nodes.cluster.test", port)
            .nameserver(ns)
            .timeout(Duration::from_millis(500))
    };
    let a = start("a", SocketAddr::from(([127, 0, 0, 21], port)), disco()).await;
    let b = start("b", SocketAddr::from(([127, 0, 0, 22], port)), disco()).await;
    let ta: Table<String, u64> = a.start("t", TableOptions::set()).await.unwrap();
    let tb: Table<String, u64> = b.start("t", TableOptions::set()).await.unwrap();
    ta.insert("x".into(), 1).await.unwrap();
    for ip in [[127, 0, 0, 21], [127, 0, 0, 22]] {
        let rdata = RData::A(A::from(Ipv4Addr::from(ip)));
        dns.add(Record::from_rdata(name("nodes.cluster.test."), 60, rdata))
            .await;
    }
    wait_len(&tb, 1).await;
    tb.insert("y".into(), 2).await.unwrap();
    assert_eq!(ta.get(&"y".to_string()), Some(2));
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
