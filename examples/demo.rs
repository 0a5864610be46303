//! A guided tour of cets on one machine: three nodes on loopback find each other through a
//! shared nodes file, replicate a table, take in a fourth node, and lose one.
//!
//! ```text
//! cargo run --release --example demo
//! RUST_LOG=cets=debug cargo run --release --example demo   # with the library's logs
//! ```
//!
//! Every step waits for what it shows with a bounded poll; if something does not replicate
//! within `WAIT`, the demo says what and exits with a non-zero status.

use std::error::Error;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use cets::discovery::FileDiscovery;
use cets::{Node, NodeConfig, Table, TableOptions};

type Sessions = Table<String, String>;
type DemoResult<T = ()> = Result<T, Box<dyn Error>>;

/// How long any one step may take before the demo gives up.
const WAIT: Duration = Duration::from_secs(15);
const COOKIE: &str = "demo-cookie";

#[tokio::main]
async fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    let started = Instant::now();
    match run().await {
        Ok(()) => println!("\ndone in {:.1} s", started.elapsed().as_secs_f64()),
        Err(e) => {
            eprintln!("\ndemo FAILED: {e}");
            std::process::exit(1);
        }
    }
}

async fn run() -> DemoResult {
    let dir = tempfile::tempdir()?;
    let nodes_file = dir.path().join("nodes.txt");
    std::fs::write(
        &nodes_file,
        "# nodes of the demo cluster, one host:port a line\n",
    )?;

    step("Start three nodes (a, b, c) on 127.0.0.1, port 0");
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(start_node(name, &nodes_file).await?);
    }
    let t0 = Instant::now();
    for n in &nodes {
        append_line(&nodes_file, n.local_addr())?;
        println!("  node {:<2} listens on {}", n.name(), n.local_addr());
    }
    println!("  nodes file {}:", nodes_file.display());
    for line in std::fs::read_to_string(&nodes_file)?.lines() {
        println!("    | {line}");
    }

    step("Start the table `sessions` (a set of String -> String) on every node");
    let mut tables: Vec<Sessions> = Vec::new();
    for n in &nodes {
        tables.push(n.start("sessions", TableOptions::set()).await?);
    }
    for (n, t) in nodes.iter().zip(&tables) {
        let expected = nodes.len() - 1;
        wait_until(
            &format!("{} to replicate to {expected} nodes", n.name()),
            || t.nodes().len() == expected,
        )
        .await?;
    }
    println!(
        "  {} ms after the addresses were written: discovered, connected and joined",
        t0.elapsed().as_millis()
    );
    for (n, t) in nodes.iter().zip(&tables) {
        println!("  {} replicates to {:?}", n.name(), t.nodes());
    }

    let (a, b, c) = (&tables[0], &tables[1], &tables[2]);

    step("Write on a; read locally on b and c");
    let t0 = Instant::now();
    a.insert("alice".into(), "laptop".into()).await?;
    println!(
        "  a: insert alice = laptop   (returned after b and c acked, {} us)",
        t0.elapsed().as_micros()
    );
    for (n, t) in nodes.iter().zip(&tables).skip(1) {
        let v = t.get(&"alice".to_string());
        println!("  {}: get alice -> {:?}", n.name(), v);
        expect(v.as_deref() == Some("laptop"), "alice replicated")?;
    }

    step("Write many at once on b (one replicated batch)");
    let batch: Vec<(String, String)> = (1..=1000)
        .map(|i| (format!("user-{i:04}"), format!("device-{i}")))
        .collect();
    let t0 = Instant::now();
    b.insert_many(batch).await?;
    println!(
        "  b: insert_many 1000 records ({} ms)",
        t0.elapsed().as_millis()
    );
    println!("  len on a, b, c: {}", lens(&tables));
    expect(
        tables.iter().all(|t| t.len() == 1001),
        "1001 records everywhere",
    )?;

    step("Concurrent writes to one key from a and c converge (last writer wins, HLC)");
    let (ra, rc) = tokio::join!(
        a.insert("bob".into(), "phone (from a)".into()),
        c.insert("bob".into(), "tablet (from c)".into()),
    );
    ra?;
    rc?;
    let seen: Vec<Option<String>> = tables.iter().map(|t| t.get(&"bob".to_string())).collect();
    for (n, v) in nodes.iter().zip(&seen) {
        println!("  {}: get bob -> {:?}", n.name(), v);
    }
    expect(
        seen.iter().all(|v| v.is_some() && *v == seen[0]),
        "bob has the same value everywhere",
    )?;

    step("Delete on c; the key is gone on a and b");
    println!("  len on a, b, c: {}", lens(&tables));
    c.delete(&"alice".to_string()).await?;
    println!("  c: delete alice");
    for (n, t) in nodes.iter().zip(&tables).take(2) {
        let v = t.get(&"alice".to_string());
        println!("  {}: get alice -> {:?}", n.name(), v);
        expect(v.is_none(), "the delete replicated")?;
    }
    println!("  len on a, b, c: {}", lens(&tables));

    step("Add node d: start it and append its address to the nodes file");
    let d_node = start_node("d", &nodes_file).await?;
    let d: Sessions = d_node.start("sessions", TableOptions::set()).await?;
    append_line(&nodes_file, d_node.local_addr())?;
    println!("  node d  listens on {}", d_node.local_addr());
    let t0 = Instant::now();
    let want = a.len();
    wait_until("d to join the three others", || d.nodes().len() == 3).await?;
    d_node.wait_for_ready(WAIT).await?;
    wait_until(&format!("d to hold {want} records"), || d.len() == want).await?;
    println!(
        "  d caught up in {} ms: {} records, replicates to {:?}",
        t0.elapsed().as_millis(),
        d.len(),
        d.nodes()
    );
    let v = d.get(&"user-0042".to_string());
    println!("  d: get user-0042 -> {v:?}");
    expect(v.as_deref() == Some("device-42"), "d copied b's records")?;
    d.insert("carol".into(), "desktop".into()).await?;
    println!(
        "  d: insert carol = desktop; a sees {:?}",
        a.get(&"carol".to_string())
    );
    expect(
        tables
            .iter()
            .all(|t| t.get(&"carol".to_string()).as_deref() == Some("desktop")),
        "d's write replicated",
    )?;

    step("Health report of d");
    let status = d_node.status().await;
    print!("{}", indent(&status.to_string()));

    step("Node b leaves; every survivor drops the records b owned");
    let before = d.len();
    let t0 = Instant::now();
    nodes[1].shutdown().await?;
    println!("  b: shutdown ({} ms)", t0.elapsed().as_millis());
    let survivors = [(&nodes[0], a), (&nodes[2], c), (&d_node, &d)];
    for (n, t) in survivors {
        wait_until(&format!("{} to drop b's records", n.name()), || {
            t.len() == before - 1000
        })
        .await?;
    }
    println!(
        "  records before: {before}; after on a, c, d: {}",
        survivors
            .iter()
            .map(|(_, t)| t.len().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("  a replicates to {:?}", a.nodes());

    step("Shut down");
    let t0 = Instant::now();
    let (ra, rc, rd) = tokio::join!(nodes[0].shutdown(), nodes[2].shutdown(), d_node.shutdown());
    ra?;
    rc?;
    rd?;
    println!("  all nodes stopped ({} ms)", t0.elapsed().as_millis());
    Ok(())
}

async fn start_node(name: &str, nodes_file: &Path) -> DemoResult<Node> {
    let node = Node::builder(name)
        .listen("127.0.0.1:0".parse()?)
        .cookie(COOKIE)
        .config(NodeConfig::fast_failover())
        .discovery(FileDiscovery::new(nodes_file))
        .start()
        .await?;
    Ok(node)
}

fn append_line(path: &Path, addr: SocketAddr) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    writeln!(f, "{addr}")
}

/// Polls `cond` every 10 ms until it holds, or fails after [`WAIT`].
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) -> DemoResult {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        if Instant::now() > deadline {
            return Err(format!("timed out after {WAIT:?} waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn expect(ok: bool, what: &str) -> DemoResult {
    if ok {
        Ok(())
    } else {
        Err(format!("expected: {what}").into())
    }
}

fn lens(tables: &[Sessions]) -> String {
    tables
        .iter()
        .map(|t| t.len().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn indent(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let _ = writeln!(out, "  {line}");
    }
    out
}
