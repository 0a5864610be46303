//! Node down (`down` section): a node killed with SIGKILL in a child process, and what the
//! survivors take to notice and drop its records.

use super::*;

pub(crate) fn down_config() -> NodeConfig {
    NodeConfig::fast_failover()
}

/// The node that gets killed: joins the peers in `CETS_BENCH_PEERS`, writes
/// `CETS_BENCH_RECORDS` records, prints `READY`, and waits (until its stdin closes).
pub(crate) fn child_node() -> Res<()> {
    let peers: Vec<SocketAddr> = std::env::var("CETS_BENCH_PEERS")?
        .split(',')
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let n: u64 = std::env::var("CETS_BENCH_RECORDS")?.parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let expected = peers.len();
        let node = start_node("down-victim", peers, down_config()).await?;
        let t: Tab = node.start("down", TableOptions::set()).await?;
        let t2 = t.clone();
        wait_until(Duration::from_secs(30), "the victim to join", move || {
            t2.nodes().len() == expected
        })
        .await?;
        fill(&t, 1 << 40..(1 << 40) + n, 1000).await?;
        println!("READY");
        tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).is_ok_and(|r| r > 0) {}
        })
        .await?;
        drop(node);
        Res::Ok(())
    })
}

pub(crate) async fn down(s: &Settings) -> Res<Vec<Row>> {
    use tokio::io::AsyncBufReadExt;

    let cfg = down_config();
    let idle = cfg.idle_timeout;
    let n = s.down_records;
    let c = Cluster::start("down", 2, "down", cfg.clone()).await?;
    let addrs: Vec<String> = c.nodes.iter().map(|n| n.local_addr().to_string()).collect();

    // SIGKILL: the victim is this binary in another process.
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .env("CETS_BENCH_CHILD", "node")
        .env("CETS_BENCH_PEERS", addrs.join(","))
        .env("CETS_BENCH_RECORDS", n.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(l) = lines.next_line().await? {
            if l.trim() == "READY" {
                return Ok(true);
            }
        }
        std::io::Result::Ok(false)
    })
    .await;
    if !matches!(ready, Ok(Ok(true))) {
        let _ = child.start_kill();
        return Err("the victim process did not get ready".into());
    }
    let ts = c.tables.clone();
    wait_until(
        Duration::from_secs(10),
        "the survivors to hold the victim's records",
        || ts.iter().all(|t| t.len() as u64 == n),
    )
    .await?;
    let t0 = Instant::now();
    child.start_kill()?;
    let mut gone = Vec::new();
    for t in &c.tables {
        let t = t.clone();
        gone.push(tokio::spawn(async move {
            wait_until(
                Duration::from_secs(30),
                "the victim's records to go",
                || t.is_empty(),
            )
            .await?;
            Res::Ok(t0.elapsed())
        }));
    }
    let mut killed = Duration::ZERO;
    for g in gone {
        killed = killed.max(g.await??);
    }
    let _ = child.wait().await;

    // Graceful: an in-process node writes n records, then shuts down.
    let survivors: Vec<SocketAddr> = addrs.iter().map(|a| a.parse()).collect::<Result<_, _>>()?;
    let (d, td) = joined_third("down-graceful", survivors.clone(), cfg.clone()).await?;
    fill(&td, 2 << 40..(2 << 40) + n, 1000).await?;
    let ts = c.tables.clone();
    wait_until(
        Duration::from_secs(10),
        "the survivors to hold its records",
        || ts.iter().all(|t| t.len() as u64 == n),
    )
    .await?;
    let t0 = Instant::now();
    d.shutdown().await?;
    let shut = t0.elapsed();
    let ts = c.tables.clone();
    wait_until(
        Duration::from_secs(30),
        "the graceful node's records to go",
        || ts.iter().all(|t| t.is_empty()),
    )
    .await?;
    let graceful = t0.elapsed();
    drop(td);

    // Shutdown while a dial is in flight: discovery also lists an address where a socket takes
    // the dial's packets and never answers.
    let silent = tokio::net::UdpSocket::bind(loopback()).await?;
    let mut peers = survivors;
    peers.push(silent.local_addr()?);
    let (e, te) = joined_third("down-dialing", peers, cfg).await?;
    let mut buf = [0u8; 2048];
    tokio::time::timeout(Duration::from_secs(10), silent.recv_from(&mut buf))
        .await
        .map_err(|_| "no dial reached the silent address")??;
    let t0 = Instant::now();
    e.shutdown().await?;
    let shut_dialing = t0.elapsed();
    drop(te);
    c.shutdown().await;

    let k = n / 1000;
    Ok(vec![
        Row::new(format!("node down (SIGKILL), {k}k records owned by it, 3 nodes"))
            .value(ms(killed))
            .baseline(format!("{} idle timeout", ms(idle)))
            .ratio(ratio(killed.as_secs_f64() / idle.as_secs_f64()))
            .target("≤ timeout + 0.5 s", killed <= idle + Duration::from_millis(500))
            .notes(format!(
                "victim is a separate process killed with SIGKILL; time until both survivors dropped its records; NodeConfig::fast_failover (keep-alive {} ms, idle {} ms)",
                down_config().keep_alive_interval.as_millis(),
                idle.as_millis()
            )),
        Row::new(format!("node down (graceful shutdown), {k}k records, 3 nodes"))
            .value(ms(graceful))
            .notes(format!("in-process node, from shutdown() until both survivors dropped its records; shutdown() itself took {}", ms(shut))),
        Row::new("shutdown() with a dial in flight to a silent address")
            .value(ms(shut_dialing))
            .baseline(format!("{} shutdown() with none", ms(shut)))
            .ratio(ratio(shut_dialing.as_secs_f64() / shut.as_secs_f64()))
            .notes("for reference: a node joined with 2 peers whose discovery also lists an address that never answers; shutdown() waits until its close of each peer connection is sent, not for the unanswered dial (which would drain for seconds)".to_string()),
    ])
}
