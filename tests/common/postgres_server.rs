//! The PostgreSQL server the tests of the backend use: the shared one named by
//! `CETS_TEST_POSTGRES_URL`, or a private one a test starts, stops and starts again with
//! `.ci/postgres` (PostgreSQL's binaries must be installed where the test runs).
#![allow(dead_code)]

use std::path::Path;

/// The server's URL, or `None` (after saying so) when the tests should skip.
pub fn url() -> Option<String> {
    match std::env::var("CETS_TEST_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ if std::env::var("CETS_POSTGRES_REQUIRED").as_deref() == Ok("1") => {
            panic!("CETS_POSTGRES_REQUIRED=1 but CETS_TEST_POSTGRES_URL is not set")
        }
        _ => {
            // Straight to stderr: the test harness captures `eprintln!`.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: set CETS_TEST_POSTGRES_URL (e.g. postgresql://postgres@127.0.0.1:5432/postgres) \
                 to run tests/postgres.rs against a real server"
            );
            None
        }
    }
}

/// A PostgreSQL server of this test's own (`.ci/postgres`, in a temporary directory), which
/// it stops and starts again while nodes use it; stopped and removed when dropped.
pub struct OwnServer {
    dir: tempfile::TempDir,
    /// Its connection URL.
    pub url: String,
}

impl OwnServer {
    fn script() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/postgres")
    }

    /// Runs `.ci/postgres what` on it (`pause`: stops it, keeping its data; `resume`).
    pub async fn ctl(&self, what: &str) {
        let st = tokio::process::Command::new(Self::script())
            .args([what, &self.dir.path().display().to_string()])
            .status()
            .await
            .unwrap();
        assert!(st.success(), ".ci/postgres {what} failed");
    }

    /// Starts one, or prints `SKIPPED` and returns `None` where PostgreSQL cannot run here
    /// (a failure when `CETS_POSTGRES_REQUIRED=1`).
    pub async fn start_or_skip() -> Option<OwnServer> {
        match Self::start().await {
            Ok(s) => Some(s),
            Err(why) => {
                assert!(
                    std::env::var("CETS_POSTGRES_REQUIRED").as_deref() != Ok("1"),
                    "CETS_POSTGRES_REQUIRED=1 but .ci/postgres could not start a server: {why}"
                );
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "SKIPPED: no server of its own: {why}");
                None
            }
        }
    }

    /// Sends `signal` to the server and every process it started (`libc::SIGSTOP` freezes it
    /// with its connections open: it stops answering, as a hung server does; `SIGCONT`).
    pub fn signal_all(&self, signal: i32) {
        let pid_file = self.dir.path().join("data/postmaster.pid");
        let pid: i32 = std::fs::read_to_string(pid_file)
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut pids = vec![pid];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": the fields after the last ')'.
            let after = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
            let ppid = after
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(pid) {
                pids.extend(
                    entry
                        .file_name()
                        .to_str()
                        .and_then(|p| p.parse::<i32>().ok()),
                );
            }
        }
        for p in pids {
            // SAFETY: kill(2) with a pid read from /proc and a valid signal number.
            unsafe { libc::kill(p, signal) };
        }
    }

    /// Starts one, or says why not (needs PostgreSQL's binaries, and root or a user that may
    /// run them).
    async fn start() -> std::result::Result<OwnServer, String> {
        let dir = tempfile::Builder::new()
            .prefix("cets-pg-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let out = tokio::process::Command::new(Self::script())
            .args(["start", &dir.path().display().to_string()])
            .output()
            .await
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(OwnServer { dir, url })
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = std::process::Command::new(Self::script())
            .args(["stop", &self.dir.path().display().to_string()])
            .status();
    }
}
