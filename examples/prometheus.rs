//! Serves the metrics of two nodes on loopback in the Prometheus text format.
//!
//! ```text
//! cargo run --example prometheus                    # serves http://127.0.0.1:9464/metrics
//! cargo run --example prometheus -- 127.0.0.1:9100  # another address
//! cargo run --example prometheus -- --check         # prints its own cets_ lines once, exits
//! ```
//!
//! The recorder is installed before the nodes start: cets registers its metric handles when a
//! node or table starts, with the recorder installed at that moment. Both nodes record into the
//! one recorder; the `node` label tells them apart. The list of metrics is in `cets::metrics`.

use std::error::Error;
use std::net::SocketAddr;
use std::time::Duration;

use cets::discovery::StaticDiscovery;
use cets::{Node, NodeConfig, Table, TableOptions};
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Res<T = ()> = Result<T, Box<dyn Error>>;

#[tokio::main]
async fn main() -> Res {
    let mut addr: SocketAddr = "127.0.0.1:9464".parse()?;
    let mut check = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--check" => check = true,
            a => addr = a.parse()?,
        }
    }
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()?;

    let a = start("a").await?;
    let b = start("b").await?;
    let addrs = vec![a.0.local_addr(), b.0.local_addr()];
    a.1.set(addrs.clone());
    b.1.set(addrs);
    let ta: Table<u64, String> = a.0.start("sessions", TableOptions::set()).await?;
    let tb: Table<u64, String> = b.0.start("sessions", TableOptions::set()).await?;
    // Until the nodes have joined, writes stay local; wait for the join (bounded).
    let joined = tokio::time::timeout(Duration::from_secs(15), async {
        while ta.nodes().is_empty() || tb.nodes().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    joined
        .await
        .map_err(|_| "the two nodes did not join within 15 s")?;
    for i in 0..100 {
        ta.insert(i, format!("session {i}")).await?;
    }

    let url = format!("http://{addr}/metrics");
    if check {
        // The gauges are sampled every 100 ms by each table server.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let body = get(addr).await?;
        for line in body.lines().filter(|l| l.starts_with("cets_")) {
            println!("{line}");
        }
        a.0.shutdown().await?;
        b.0.shutdown().await?;
        return Ok(());
    }
    println!("metrics of nodes a and b at {url} (Ctrl-C stops)");
    let mut i = 100u64;
    let mut every = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = every.tick() => {
                // Some traffic, so that the counters and histograms move.
                tb.insert(i % 1000, format!("session {i}")).await?;
                i += 1;
            }
        }
    }
    a.0.shutdown().await?;
    b.0.shutdown().await?;
    Ok(())
}

async fn start(name: &str) -> Res<(Node, cets::discovery::StaticDiscoveryHandle)> {
    let disco = StaticDiscovery::new(Vec::<SocketAddr>::new());
    let handle = disco.handle();
    let node = Node::builder(name)
        .listen("127.0.0.1:0".parse()?)
        .cookie("prometheus-example")
        .config(NodeConfig::default())
        .discovery(disco)
        .start()
        .await?;
    Ok((node, handle))
}

/// A plain HTTP/1.0 GET of `/metrics` (enough for the exporter; no client dependency).
async fn get(addr: SocketAddr) -> Res<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}
