//! Nodes in separate processes: the test binary runs one of its own ignored tests as a child.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

/// A child's standard output, line by line.
pub type ChildLines = Lines<BufReader<ChildStdout>>;

/// Starts this test binary again running only the ignored test `test`, with `env` set.
pub fn spawn(test: &str, env: (&str, String)) -> (Child, ChildLines) {
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            test,
            "--nocapture",
            "--test-threads=1",
        ])
        .env(env.0, env.1)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

/// The first line the child prints that contains `word`, from `word` on (the test harness's
/// own "test ... " may precede it on the line). Panics if the child ends first or says
/// nothing of the kind within `wait`.
pub async fn line_with(lines: &mut ChildLines, word: &str, wait: Duration) -> String {
    let found = tokio::time::timeout(wait, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(i) = line.find(word) {
                return Some(line[i..].trim().to_string());
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(line)) => line,
        Ok(None) => panic!("child ended before saying {word:?}"),
        Err(_) => panic!("child did not say {word:?} within {wait:?}"),
    }
}

/// Starts this test binary again running only the ignored test `test`, with `env` set, and
/// waits (up to `wait`) until the child prints a line containing `ready`.
pub async fn spawn_ready(test: &str, env: (&str, String), ready: &str, wait: Duration) -> Child {
    let (child, mut lines) = spawn(test, env);
    line_with(&mut lines, ready, wait).await;
    child
}

/// Starts one child per name running the ignored test `test`, which reads
/// `name;dir;nodes_file;mode` from the variable `env` (`dir` is `root/name`), prints
/// `addr <address>` once it listens and then finds the others through the nodes file, written
/// here once every child has said its address. Returns the children with their output.
pub async fn spawn_cluster(
    root: &Path,
    names: &[&str],
    test: &str,
    env: &str,
    mode: &str,
) -> Vec<(Child, ChildLines)> {
    let nodes = root.join(format!("nodes-{mode}.txt"));
    std::fs::write(&nodes, "").unwrap();
    let mut children = Vec::new();
    for name in names {
        let dir = root.join(name);
        let spec = format!("{name};{};{};{mode}", dir.display(), nodes.display());
        children.push(spawn(test, (env, spec)));
    }
    let mut addrs = Vec::new();
    for (_, lines) in &mut children {
        let said = line_with(lines, "addr ", Duration::from_secs(60)).await;
        addrs.push(said["addr ".len()..].trim().to_string());
    }
    std::fs::write(&nodes, addrs.join("\n")).unwrap();
    children
}

/// From each child, the line that contains `word`, from `word` on.
pub async fn each_says(children: &mut [(Child, ChildLines)], word: &str) -> Vec<String> {
    let mut said = Vec::new();
    for (_, lines) in children {
        said.push(line_with(lines, word, Duration::from_secs(120)).await);
    }
    said
}

/// Writes `line` to each child's standard input.
pub async fn tell_each(children: &mut [(Child, ChildLines)], line: &str) {
    use tokio::io::AsyncWriteExt;
    for (child, _) in children {
        let stdin = child.stdin.as_mut().unwrap();
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
    }
}
