//! [`FileDiscovery`]: peers listed in a text file, re-read on every poll.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::peer::normalize;
use crate::{Discovery, Error, Peer, Result};

/// How many host names are resolved at the same time.
const RESOLVE_CONCURRENCY: usize = 8;

/// Lines longer than this are rejected (a `host:port` entry is far shorter).
const MAX_LINE_LEN: usize = 1024;

/// How much of a bad line is quoted in logs and errors.
const QUOTE_LEN: usize = 120;

/// A discovery backend reading peers from a text file.
///
/// The format is one `host:port` entry per line:
///
/// ```text
/// # cluster nodes
/// 10.0.0.1:4370
/// 10.0.0.2:4370          # trailing comments are fine
/// [fd00::3]:4370         # IPv6 addresses in brackets
/// node4.cluster.local:4370
/// ```
///
/// - Everything after a `#` is a comment; blank lines are skipped; whitespace around an
///   entry is trimmed.
/// - Host names are resolved with the system resolver ([`tokio::net::lookup_host`]); every
///   address a name resolves to becomes a peer.
/// - The file is read again on every [`get_nodes`](Discovery::get_nodes) call, so edits are
///   picked up without a restart. Nothing is cached.
/// - A line that is not a valid entry is logged (with `tracing::warn!`, naming the line
///   number and the reason) and skipped; the other lines are still returned. With
///   [`strict(true)`](FileDiscovery::strict) a bad line fails the whole call with
///   [`Error::BadLine`] instead.
/// - A host name that does not resolve is logged and skipped, unless nothing at all could
///   be resolved, in which case the resolution error is returned (so that an outage of the
///   system resolver is not mistaken for an empty cluster).
/// - A file that cannot be read is an [`Error::Io`]; a file larger than
///   [`max_bytes`](FileDiscovery::max_bytes) (1 MiB by default) is an
///   [`Error::FileTooLarge`], and only the first [`max_peers`](FileDiscovery::max_peers)
///   entries are used, so memory stays bounded whatever the file holds.
///
/// The result is sorted and deduplicated.
///
/// ```no_run
/// # async fn demo() -> cets_discovery::Result<()> {
/// use cets_discovery::{Discovery, FileDiscovery};
///
/// let mut disco = FileDiscovery::new("/etc/cets/nodes.txt");
/// for peer in disco.get_nodes().await? {
///     println!("{peer}");
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct FileDiscovery {
    path: PathBuf,
    max_bytes: u64,
    max_peers: usize,
    resolve_timeout: Duration,
    strict: bool,
    /// Hash of the file content whose bad lines were last logged at `warn` level, so that
    /// an unchanged file does not repeat the same warnings on every poll.
    warned_for: Option<u64>,
}

impl FileDiscovery {
    /// The default size limit of the file: 1 MiB.
    pub const DEFAULT_MAX_BYTES: u64 = 1024 * 1024;
    /// The default limit on the number of entries used: 4096.
    pub const DEFAULT_MAX_PEERS: usize = 4096;
    /// The default time allowed for resolving one host name: 5 s.
    pub const DEFAULT_RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

    /// A backend reading the file at `path`. The file need not exist yet: it is read on each
    /// [`get_nodes`](Discovery::get_nodes) call.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileDiscovery {
            path: path.into(),
            max_bytes: Self::DEFAULT_MAX_BYTES,
            max_peers: Self::DEFAULT_MAX_PEERS,
            resolve_timeout: Self::DEFAULT_RESOLVE_TIMEOUT,
            strict: false,
            warned_for: None,
        }
    }

    /// The path of the nodes file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Refuses files larger than `bytes` with [`Error::FileTooLarge`]
    /// (default [`DEFAULT_MAX_BYTES`](Self::DEFAULT_MAX_BYTES)).
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// Uses at most `n` entries of the file; later entries are logged and ignored
    /// (default [`DEFAULT_MAX_PEERS`](Self::DEFAULT_MAX_PEERS)).
    pub fn max_peers(mut self, n: usize) -> Self {
        self.max_peers = n;
        self
    }

    /// The time allowed for resolving one host name
    /// (default [`DEFAULT_RESOLVE_TIMEOUT`](Self::DEFAULT_RESOLVE_TIMEOUT)).
    pub fn resolve_timeout(mut self, timeout: Duration) -> Self {
        self.resolve_timeout = timeout;
        self
    }

    /// In strict mode a bad line, an entry over the limit or a host name that does not
    /// resolve fails the whole call instead of being skipped. Off by default.
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// Reads the whole file, refusing anything that is not a regular file or is too large.
    async fn read(&self) -> Result<Vec<u8>> {
        let io_err = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        let too_large = || Error::FileTooLarge {
            path: self.path.clone(),
            limit: self.max_bytes,
        };
        // Check first, so that a FIFO or a device is never opened (opening a FIFO blocks).
        let meta = tokio::fs::metadata(&self.path).await.map_err(io_err)?;
        if !meta.is_file() {
            return Err(Error::NotAFile {
                path: self.path.clone(),
            });
        }
        if meta.len() > self.max_bytes {
            return Err(too_large());
        }
        let file = tokio::fs::File::open(&self.path).await.map_err(io_err)?;
        // The file may grow between the check and the read: never read past the limit.
        let cap = usize::try_from(meta.len()).unwrap_or(0);
        let mut buf = Vec::with_capacity(cap);
        file.take(self.max_bytes.saturating_add(1))
            .read_to_end(&mut buf)
            .await
            .map_err(io_err)?;
        if buf.len() as u64 > self.max_bytes {
            return Err(too_large());
        }
        Ok(buf)
    }

    fn bad_line(&self, line_no: usize, line: &str, reason: String, warn: bool) -> Result<()> {
        let line = quote(line);
        if self.strict {
            return Err(Error::BadLine {
                path: self.path.clone(),
                line_no,
                line,
                reason,
            });
        }
        if warn {
            tracing::warn!(path = %self.path.display(), line_no, %line, %reason, "skipping bad line in nodes file");
        } else {
            tracing::debug!(path = %self.path.display(), line_no, %line, %reason, "skipping bad line in nodes file");
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Discovery for FileDiscovery {
    async fn get_nodes(&mut self) -> Result<Vec<Peer>> {
        let content = self.read().await?;
        let hash = {
            let mut h = DefaultHasher::new();
            content.hash(&mut h);
            h.finish()
        };
        // Warn about a given file content once; repeat at debug level on later polls.
        let warn = self.warned_for != Some(hash);

        let mut peers = Vec::new();
        let mut hosts = Vec::new();
        let mut entries = 0usize;
        for (idx, raw) in content.split(|b| *b == b'\n').enumerate() {
            let line_no = idx + 1;
            let line = match std::str::from_utf8(raw) {
                Ok(line) => line,
                Err(_) => {
                    let shown = String::from_utf8_lossy(raw);
                    self.bad_line(line_no, &shown, "not valid UTF-8".into(), warn)?;
                    continue;
                }
            };
            let line = if line_no == 1 {
                line.strip_prefix('\u{feff}').unwrap_or(line)
            } else {
                line
            };
            let entry = match parse_line(line) {
                Ok(None) => continue,
                Ok(Some(entry)) => entry,
                Err(reason) => {
                    self.bad_line(line_no, line.trim(), reason, warn)?;
                    continue;
                }
            };
            if entries == self.max_peers {
                let reason = format!("more than {} entries; the rest is ignored", self.max_peers);
                self.bad_line(line_no, line.trim(), reason, warn)?;
                break;
            }
            entries += 1;
            match entry {
                Entry::Addr(addr) => peers.push(Peer::new(addr)),
                Entry::Host { host, port } => hosts.push((line_no, host, port)),
            }
        }
        self.warned_for = Some(hash);

        let had_hosts = !hosts.is_empty();
        let (resolved, first_err) = self.resolve_all(hosts).await?;
        peers.extend(resolved.into_iter().map(Peer::new));
        if peers.is_empty() && had_hosts {
            if let Some(err) = first_err {
                return Err(err);
            }
        }
        normalize(&mut peers);
        Ok(peers)
    }
}

impl FileDiscovery {
    /// Resolves host names, a few at a time. Returns the addresses found and the first
    /// failure (failures are logged; in strict mode the first one is returned as `Err`).
    async fn resolve_all(
        &self,
        hosts: Vec<(usize, String, u16)>,
    ) -> Result<(Vec<SocketAddr>, Option<Error>)> {
        let mut addrs = Vec::new();
        let mut first_err = None;
        let mut pending = hosts.into_iter();
        let mut set = JoinSet::new();
        loop {
            while set.len() < RESOLVE_CONCURRENCY {
                let Some((line_no, host, port)) = pending.next() else {
                    break;
                };
                let timeout = self.resolve_timeout;
                // In the caller's span (the node's discovery task), as every task cets spawns.
                set.spawn(
                    async move {
                        let res = resolve(&host, port, timeout).await;
                        (line_no, res)
                    }
                    .in_current_span(),
                );
            }
            let Some(joined) = set.join_next().await else {
                break;
            };
            let (line_no, res) = match joined {
                Ok(done) => done,
                // A resolution task cannot panic in our code; treat a failure to join as
                // a skipped entry rather than propagating a panic.
                Err(err) => {
                    tracing::warn!(path = %self.path.display(), %err, "host name resolution task failed");
                    continue;
                }
            };
            match res {
                Ok(found) => addrs.extend(found),
                Err(err) => {
                    if self.strict {
                        return Err(err);
                    }
                    tracing::warn!(path = %self.path.display(), line_no, %err, "skipping nodes file entry that does not resolve");
                    first_err.get_or_insert(err);
                }
            }
        }
        Ok((addrs, first_err))
    }
}

async fn resolve(host: &str, port: u16, timeout: Duration) -> Result<Vec<SocketAddr>> {
    match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(found)) => Ok(found.collect()),
        Ok(Err(source)) => Err(Error::Resolve {
            host: format!("{host}:{port}"),
            source,
        }),
        Err(_) => Err(Error::Timeout),
    }
}

/// One valid entry of a nodes file.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    /// A literal IPv4 or IPv6 socket address.
    Addr(SocketAddr),
    /// A host name to resolve, with the port to use.
    Host { host: String, port: u16 },
}

/// Parses one line: `Ok(None)` for blank and comment lines, `Err(reason)` for bad lines.
fn parse_line(line: &str) -> Result<Option<Entry>, String> {
    if line.len() > MAX_LINE_LEN {
        return Err(format!("line longer than {MAX_LINE_LEN} bytes"));
    }
    let entry = match line.find('#') {
        Some(pos) => &line[..pos],
        None => line,
    }
    .trim();
    if entry.is_empty() {
        return Ok(None);
    }
    if entry.contains(char::is_whitespace) {
        return Err("expected a single host:port entry".into());
    }
    if let Ok(addr) = entry.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err("port 0 is not a valid peer port".into());
        }
        return Ok(Some(Entry::Addr(addr)));
    }
    if entry.starts_with('[') {
        return Err("invalid IPv6 entry (expected [address]:port)".into());
    }
    let Some((host, port)) = entry.rsplit_once(':') else {
        return Err("missing port (expected host:port)".into());
    };
    if host.contains(':') {
        return Err("IPv6 addresses must be written in brackets, as [address]:port".into());
    }
    if port.is_empty() {
        return Err("missing port (expected host:port)".into());
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("invalid port {port:?} (expected 1-65535)"))?;
    if port == 0 {
        return Err("port 0 is not a valid peer port".into());
    }
    check_host_name(host)?;
    Ok(Some(Entry::Host {
        host: host.to_owned(),
        port,
    }))
}

/// Accepts DNS-style host names: letters, digits, `-` and `_` in dot-separated labels of at
/// most 63 characters, at most 253 characters in all, an optional trailing dot.
fn check_host_name(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("missing host (expected host:port)".into());
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 {
        return Err(format!("invalid host name {host:?}"));
    }
    for label in name.split('.') {
        let valid = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(format!("invalid host name {host:?}"));
        }
    }
    // A name made only of digits and dots is a malformed IPv4 address, not a host name.
    if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!("invalid IPv4 address {host:?}"));
    }
    Ok(())
}

/// Shortens a line for logs and errors, on a character boundary.
fn quote(line: &str) -> String {
    match line.char_indices().nth(QUOTE_LEN) {
        Some((pos, _)) => format!("{}...", &line[..pos]),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Result<Option<Entry>, String> {
        Ok(Some(Entry::Addr(s.parse().unwrap())))
    }

    fn host(h: &str, port: u16) -> Result<Option<Entry>, String> {
        Ok(Some(Entry::Host {
            host: h.into(),
            port,
        }))
    }

    #[test]
    fn parses_entries() {
        assert_eq!(parse_line("10.0.0.1:4370"), addr("10.0.0.1:4370"));
        assert_eq!(parse_line("  10.0.0.1:4370\t"), addr("10.0.0.1:4370"));
        assert_eq!(parse_line("10.0.0.1:4370 # n1"), addr("10.0.0.1:4370"));
        assert_eq!(parse_line("10.0.0.1:4370#n1"), addr("10.0.0.1:4370"));
        assert_eq!(parse_line("[::1]:4000"), addr("[::1]:4000"));
        assert_eq!(parse_line("[fd00::1]:4000\r"), addr("[fd00::1]:4000"));
        assert_eq!(parse_line("localhost:4000"), host("localhost", 4000));
        assert_eq!(
            parse_line("node-1.cluster_a.local.:9"),
            host("node-1.cluster_a.local.", 9)
        );
    }

    #[test]
    fn skips_blanks_and_comments() {
        for line in [
            "",
            "   ",
            "\t",
            "# comment",
            "   # indented comment",
            "\r",
            "#",
        ] {
            assert_eq!(parse_line(line), Ok(None), "{line:?}");
        }
    }

    #[test]
    fn rejects_bad_lines() {
        let long = format!("{}:1", "a".repeat(2000));
        let label = format!("{}.example:1", "a".repeat(64));
        for line in [
            "10.0.0.1",
            "10.0.0.1:",
            "10.0.0.1:0",
            "10.0.0.1:65536",
            "10.0.0.1:http",
            "10.0.0.256:1",
            "1.2.3:4",
            "::1:4000",
            "[::1]",
            "[::1]:",
            "[zz::1]:4000",
            ":4000",
            "host name:1",
            "a:1 b:2",
            "bad!host:1",
            "-bad.example:1",
            "a..b:1",
            ".:1",
            "localhost",
            label.as_str(),
            long.as_str(),
        ] {
            assert!(parse_line(line).is_err(), "{line:?} should be rejected");
        }
    }

    #[test]
    fn quote_shortens_on_char_boundary() {
        assert_eq!(quote("short"), "short");
        let long = "é".repeat(500);
        let q = quote(&long);
        assert!(q.ends_with("..."));
        assert_eq!(q.chars().count(), QUOTE_LEN + 3);
    }
}
