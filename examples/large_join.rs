//! How long two nodes take to join two large tables: `n` records on each side (distinct keys,
//! a `u64` key and a 16-byte value), under `NodeConfig::fast_failover` (a 2 s join lease).
//!
//! ```text
//! cargo run --release --example large_join               # 10 M + 10 M
//! cargo run --release --example large_join -- 1000000    # 1 M + 1 M
//! ```
//!
//! Prints the time from `Node::connect` until both nodes hold the union as members of each
//! other. Both nodes run in this process (about 6 GB of memory for 10 M + 10 M).

use std::error::Error;
use std::time::{Duration, Instant};

use cets::discovery::StaticDiscovery;
use cets::{Node, NodeConfig, Table, TableOptions};

type Tab = Table<u64, [u8; 16]>;

async fn node(name: &str) -> Result<Node, Box<dyn Error>> {
    Ok(Node::builder(name)
        .listen("127.0.0.1:0".parse()?)
        .cookie("large-join")
        .config(NodeConfig::fast_failover())
        .discovery(StaticDiscovery::new(Vec::<std::net::SocketAddr>::new()))
        .start()
        .await?)
}

async fn fill(t: &Tab, keys: std::ops::Range<u64>) -> Result<(), Box<dyn Error>> {
    let mut k = keys.start;
    while k < keys.end {
        let end = (k + 100_000).min(keys.end);
        t.insert_many(
            (k..end)
                .map(|k| (k, k.to_le_bytes().repeat(2).try_into().unwrap_or_default()))
                .collect(),
        )
        .await?;
        k = end;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let n: u64 = match std::env::args().nth(1) {
        Some(a) => a.parse()?,
        None => 10_000_000,
    };
    let a = node("a").await?;
    let b = node("b").await?;
    let ta: Tab = a.start("t", TableOptions::set()).await?;
    let tb: Tab = b.start("t", TableOptions::set()).await?;
    let filled = Instant::now();
    fill(&ta, 0..n).await?;
    fill(&tb, n..2 * n).await?;
    println!("filled {n} + {n} records in {:?}", filled.elapsed());
    let started = Instant::now();
    a.connect(b.local_addr());
    let deadline = started + Duration::from_secs(300);
    loop {
        let whole = 2 * n as usize;
        if ta.len() == whole && tb.len() == whole && ta.nodes() == ["b"] && tb.nodes() == ["a"] {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "not joined after 300 s: a holds {}, b holds {}",
                ta.len(),
                tb.len()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "joined {n} + {n} records in {:?} (fast_failover: 2 s lease)",
        started.elapsed()
    );
    a.shutdown().await?;
    b.shutdown().await?;
    Ok(())
}
