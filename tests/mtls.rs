//! Mutual TLS with a cluster CA: only nodes whose certificate the CA signed can connect.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cets::discovery::StaticDiscovery;
use cets::{Node, NodeConfig, Table, TableOptions, TlsConfig};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

type Ca = CertifiedIssuer<'static, KeyPair>;

fn ca() -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

fn node_tls(ca: &Ca, name: &str) -> TlsConfig {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&key, ca)
        .unwrap();
    TlsConfig::from_pem(
        ca.pem().as_bytes(),
        cert.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
    )
    .unwrap()
}

async fn node(name: &str, tls: Option<TlsConfig>, peers: Vec<SocketAddr>) -> Node {
    let mut b = Node::builder(name)
        .listen("127.0.0.1:0".parse().unwrap())
        .config(NodeConfig::fast_failover())
        .discovery(StaticDiscovery::new(peers));
    if let Some(t) = tls {
        b = b.tls(t);
    }
    b.start().await.unwrap()
}

async fn until(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_signed_by_the_cluster_ca_replicate() {
    let ca = ca();
    let a = node("a", Some(node_tls(&ca, "a")), vec![]).await;
    let b = node("b", Some(node_tls(&ca, "b")), vec![a.local_addr()]).await;
    let ta: Table<u64, u64> = a.start("t", TableOptions::set()).await.unwrap();
    let tb: Table<u64, u64> = b.start("t", TableOptions::set()).await.unwrap();
    until("joined", async || {
        ta.nodes().len() == 1 && tb.nodes().len() == 1
    })
    .await;
    tb.insert(1, 2).await.unwrap();
    assert_eq!(ta.get(&1), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_outside_the_ca_are_refused() {
    let ca = ca();
    let a = node("a", Some(node_tls(&ca, "a")), vec![]).await;
    // b: signed by another CA; c: no mutual TLS at all (self-signed, cookie only).
    let b = node("b", Some(node_tls(&self::ca(), "b")), vec![a.local_addr()]).await;
    let c = node("c", None, vec![a.local_addr()]).await;
    let ta: Table<u64, u64> = a.start("t", TableOptions::set()).await.unwrap();
    let tb: Table<u64, u64> = b.start("t", TableOptions::set()).await.unwrap();
    let tc: Table<u64, u64> = c.start("t", TableOptions::set()).await.unwrap();
    tb.insert(1, 1).await.unwrap();
    tc.insert(2, 2).await.unwrap();
    until("b and c report a as unavailable", async || {
        b.status().await.unavailable.len() == 1 && c.status().await.unavailable.len() == 1
    })
    .await;
    for n in [&a, &b, &c] {
        assert!(n.status().await.connected.is_empty());
    }
    assert!(ta.is_empty());
}

#[test]
fn bad_pem_is_a_clear_error() {
    let ca = ca();
    let err = TlsConfig::from_pem(b"not pem", ca.pem().as_bytes(), b"nope").unwrap_err();
    assert!(matches!(err, cets::Error::Tls(_)), "{err}");
    let err = TlsConfig::from_pem_files("/nonexistent/ca.pem", "/x", "/y").unwrap_err();
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
}

/// With `require_node_names`, a certificate is good for the node names it carries only. An
/// impostor holding another CA-signed certificate cannot take a live node's name (and so
/// replace that node's connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_node_names_bind_certificates_to_names() {
    let ca = ca();
    let named = |name: &str| node_tls(&ca, name).require_node_names();
    let a = node("a", Some(named("a")), vec![]).await;
    let b = node("b", Some(named("b")), vec![a.local_addr()]).await;
    let ta: Table<u64, u64> = a.start("t", TableOptions::set()).await.unwrap();
    let tb: Table<u64, u64> = b.start("t", TableOptions::set()).await.unwrap();
    until("joined", async || {
        ta.nodes() == ["b"] && tb.nodes() == ["a"]
    })
    .await;
    let real_b = b.id().clone();

    // A second "b", whose certificate the CA signed for "mallory" (it does not check its own
    // name, so it starts).
    let impostor = node("b", Some(node_tls(&ca, "mallory")), vec![a.local_addr()]).await;
    until("the impostor is refused", async || {
        impostor
            .status()
            .await
            .unavailable
            .iter()
            .any(|(_, why)| why.contains("does not name it"))
    })
    .await;
    assert!(impostor.status().await.connected.is_empty());
    let connected: Vec<_> = a
        .status()
        .await
        .connected
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(connected, [real_b], "a kept the real b");
    tb.insert(1, 2).await.unwrap();
    assert_eq!(ta.get(&1), Some(2));
    for n in [&a, &b, &impostor] {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_certificate_does_not_name_it_does_not_start() {
    let ca = ca();
    let tls = node_tls(&ca, "other").require_node_names();
    assert!(tls.requires_node_names());
    let err = Node::builder("a")
        .listen("127.0.0.1:0".parse().unwrap())
        .tls(tls.clone())
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, cets::Error::Tls(_)), "{err}");
    assert!(err.to_string().contains("does not name it (a)"), "{err}");
    let err = Node::builder("not a dns name")
        .listen("127.0.0.1:0".parse().unwrap())
        .tls(tls)
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is not a DNS name"), "{err}");
}
