//! One cets node you can type commands into, or run as a server process.
//!
//! ```text
//! cargo run --example node -- --name a --listen 127.0.0.1:4001 --nodes nodes.txt [--cookie s]
//! ```
//!
//! Options:
//!
//! - `--name NAME` (required): the node's name, unique in the cluster.
//! - `--listen ADDR`: UDP address to bind (default `127.0.0.1:0`).
//! - `--nodes FILE`: nodes file for discovery, one `host:port` a line (default: no discovery).
//! - `--cookie SECRET`: shared secret of the cluster (default: the library's default cookie).
//! - `--table NAME`: the table to run, `Table<String, String>` set (default `kv`).
//! - `--fast`: fast fail-over settings ([`NodeConfig::fast_failover`]).
//! - `--insert N`: once the node is ready, write `N` records `<name>-<i>` = `<name>` (i from 0)
//!   and print `inserted N`.
//! - `--serve`: do not read stdin; run until killed (Ctrl-C shuts down gracefully).
//!
//! Once started the node prints `ready <addr>` on its own line. Commands on stdin:
//! `put k v`, `get k`, `del k`, `list`, `nodes`, `status`, `sync`, `help`, `quit`.
//! End of input quits as well.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cets::discovery::FileDiscovery;
use cets::{Node, NodeConfig, Table, TableOptions};
use tokio::io::{AsyncBufReadExt, BufReader};

type Kv = Table<String, String>;

const USAGE: &str = "usage: node --name NAME [--listen ADDR] [--nodes FILE] [--cookie SECRET] \
[--table NAME] [--fast] [--insert N] [--serve]";

/// How long `--insert` waits for the node to be connected and joined.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

struct Args {
    name: String,
    listen: SocketAddr,
    nodes: Option<PathBuf>,
    cookie: Option<String>,
    table: String,
    fast: bool,
    insert: Option<usize>,
    serve: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        name: String::new(),
        listen: "127.0.0.1:0".parse().expect("a valid address"),
        nodes: None,
        cookie: None,
        table: "kv".to_string(),
        fast: false,
        insert: None,
        serve: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--name" => args.name = value()?,
            "--listen" => {
                let v = value()?;
                args.listen = v.parse().map_err(|e| format!("--listen {v}: {e}"))?;
            }
            "--nodes" => args.nodes = Some(PathBuf::from(value()?)),
            "--cookie" => args.cookie = Some(value()?),
            "--table" => args.table = value()?,
            "--insert" => {
                let v = value()?;
                args.insert = Some(v.parse().map_err(|e| format!("--insert {v}: {e}"))?);
            }
            "--fast" => args.fast = true,
            "--serve" => args.serve = true,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if args.name.is_empty() {
        return Err(format!("--name is required\n{USAGE}"));
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> cets::Result<()> {
    let mut builder = Node::builder(&args.name).listen(args.listen);
    if let Some(c) = &args.cookie {
        builder = builder.cookie(c);
    }
    if let Some(path) = &args.nodes {
        builder = builder.discovery(FileDiscovery::new(path));
    }
    if args.fast {
        builder = builder.config(NodeConfig::fast_failover());
    }
    let node = builder.start().await?;
    let table: Kv = node.start(&args.table, TableOptions::set()).await?;
    // Tests read this line to learn the address; println! flushes at the newline only when
    // stdout is a terminal, so flush explicitly.
    say(format!("ready {}", node.local_addr()));

    if let Some(n) = args.insert {
        node.wait_for_ready(READY_TIMEOUT).await?;
        let records: Vec<(String, String)> = (0..n)
            .map(|i| (format!("{}-{i}", args.name), args.name.clone()))
            .collect();
        for chunk in records.chunks(1000) {
            table.insert_many(chunk.to_vec()).await?;
        }
        say(format!("inserted {n}"));
    }

    if args.serve {
        // Run until killed; Ctrl-C (SIGINT) leaves gracefully, so peers drop our records at once.
        let _ = tokio::signal::ctrl_c().await;
    } else {
        interactive(&node, &table).await;
    }
    node.shutdown().await
}

async fn interactive(node: &Node, table: &Kv) {
    say("type `help` for the commands".to_string());
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        let line = tokio::select! {
            l = lines.next_line() => l,
            _ = tokio::signal::ctrl_c() => break,
        };
        let line = match line {
            Ok(Some(l)) => l,
            Ok(None) => break, // end of input
            Err(e) => {
                eprintln!("stdin: {e}");
                break;
            }
        };
        let mut words = line.trim().splitn(3, char::is_whitespace);
        let cmd = words.next().unwrap_or("");
        let arg1 = words.next().map(str::to_string);
        let rest = words.next().map(|s| s.trim().to_string());
        let out = match (cmd, arg1, rest) {
            ("", _, _) => continue,
            ("put", Some(k), Some(v)) => match table.insert(k, v).await {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("error: {e}"),
            },
            ("get", Some(k), None) => match table.get(&k) {
                Some(v) => v,
                None => "(not found)".to_string(),
            },
            ("del", Some(k), None) => match table.delete(&k).await {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("error: {e}"),
            },
            ("list", None, None) => {
                let mut all = table.to_vec();
                all.sort();
                let mut s: Vec<String> = all.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                s.push(format!("({} records)", all.len()));
                s.join("\n")
            }
            ("nodes", None, None) => format!("replicating to {:?}", table.nodes()),
            ("status", None, None) => node.status().await.to_string().trim_end().to_string(),
            ("sync", None, None) => match table.sync().await {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("error: {e}"),
            },
            ("quit" | "exit", None, None) => break,
            ("help", _, _) => {
                "put K V | get K | del K | list | nodes | status | sync | quit".to_string()
            }
            _ => format!("? {} (type `help`)", line.trim()),
        };
        say(out);
    }
}

/// Prints a line and flushes stdout (it may be a pipe read by a test).
fn say(line: String) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
