//! FileDiscovery against real files in a temporary directory.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cets_discovery::{Discovery, Error, FileDiscovery, Peer};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn peers(addrs: &[&str]) -> Vec<Peer> {
    let mut v: Vec<Peer> = addrs.iter().map(|a| Peer::new(addr(a))).collect();
    v.sort();
    v
}

fn write(dir: &tempfile::TempDir, name: &str, content: impl AsRef<[u8]>) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, content).unwrap();
    path
}

#[tokio::test]
async fn parses_comments_blanks_ipv6_and_skips_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "nodes.txt",
        "# cluster nodes\n\
         \n\
         10.0.0.2:4370\n\
         \t10.0.0.1:4370   # first node\n\
         [::1]:4000\n\
         [fd00::5]:4370#no space before comment\n\
         \x20\x20\n\
         not an entry\n\
         10.0.0.9\n\
         10.0.0.3:99999\n\
         ::1:4000\n\
         10.0.0.2:4370\n\
         10.0.0.4:4370\r\n\
         # trailing comment",
    );
    let mut d = FileDiscovery::new(&path);
    let got = d.get_nodes().await.unwrap();
    assert_eq!(
        got,
        peers(&[
            "10.0.0.1:4370",
            "10.0.0.2:4370",
            "10.0.0.4:4370",
            "[::1]:4000",
            "[fd00::5]:4370",
        ])
    );
    // Sorted and deduplicated.
    let mut sorted = got.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(got, sorted);
}

#[tokio::test]
async fn resolves_host_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "nodes.txt", "localhost:4000\n127.0.0.1:4000\n");
    let got = FileDiscovery::new(&path).get_nodes().await.unwrap();
    assert!(got.contains(&Peer::new(addr("127.0.0.1:4000"))), "{got:?}");
    for p in &got {
        assert!(p.addr.ip().is_loopback(), "{p}");
        assert_eq!(p.addr.port(), 4000);
        assert_eq!(p.name, None);
    }
    // 127.0.0.1:4000 from both lines appears once.
    let n = got
        .iter()
        .filter(|p| p.addr == addr("127.0.0.1:4000"))
        .count();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn unresolvable_host_is_skipped_when_others_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "nodes.txt", "nonexistent.invalid:1\n10.0.0.1:1\n");
    let mut d = FileDiscovery::new(&path).resolve_timeout(Duration::from_secs(1));
    assert_eq!(d.get_nodes().await.unwrap(), peers(&["10.0.0.1:1"]));
}

#[tokio::test]
async fn only_unresolvable_hosts_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "nodes.txt", "nonexistent.invalid:1\n");
    let mut d = FileDiscovery::new(&path).resolve_timeout(Duration::from_secs(1));
    let err = d.get_nodes().await.unwrap_err();
    assert!(
        matches!(err, Error::Resolve { .. } | Error::Timeout),
        "{err:?}"
    );
}

#[tokio::test]
async fn edits_are_picked_up_between_calls() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "nodes.txt", "10.0.0.1:4370\n");
    let mut d = FileDiscovery::new(&path);
    assert_eq!(d.get_nodes().await.unwrap(), peers(&["10.0.0.1:4370"]));

    // Same length, same second: content must still be re-read.
    std::fs::write(&path, "10.0.0.2:4370\n").unwrap();
    assert_eq!(d.get_nodes().await.unwrap(), peers(&["10.0.0.2:4370"]));

    // Atomic replace via rename, as editors and config managers do.
    let tmp = write(&dir, "nodes.tmp", "10.0.0.2:4370\n10.0.0.3:4370\n");
    std::fs::rename(&tmp, &path).unwrap();
    assert_eq!(
        d.get_nodes().await.unwrap(),
        peers(&["10.0.0.2:4370", "10.0.0.3:4370"])
    );

    std::fs::write(&path, "").unwrap();
    assert_eq!(d.get_nodes().await.unwrap(), vec![]);
}

#[tokio::test]
async fn missing_file_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.txt");
    let mut d = FileDiscovery::new(&path);
    match d.get_nodes().await {
        Err(Error::Io { path: p, source }) => {
            assert_eq!(p, path);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Error::Io, got {other:?}"),
    }
    // It comes back once the file exists.
    std::fs::write(&path, "10.0.0.1:1\n").unwrap();
    assert_eq!(d.get_nodes().await.unwrap(), peers(&["10.0.0.1:1"]));
}

#[tokio::test]
async fn directory_is_not_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = FileDiscovery::new(dir.path());
    assert!(matches!(d.get_nodes().await, Err(Error::NotAFile { .. })));
}

#[tokio::test]
async fn oversized_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut content = "10.0.0.1:1\n".repeat(10);
    content.push_str(&"#".repeat(FileDiscovery::DEFAULT_MAX_BYTES as usize));
    let path = write(&dir, "big.txt", &content);
    let mut d = FileDiscovery::new(&path);
    assert!(matches!(
        d.get_nodes().await,
        Err(Error::FileTooLarge { limit, .. }) if limit == FileDiscovery::DEFAULT_MAX_BYTES
    ));

    // A custom limit, just above and just below the size.
    let path = write(&dir, "small.txt", "10.0.0.1:1\n");
    assert!(FileDiscovery::new(&path)
        .max_bytes(11)
        .get_nodes()
        .await
        .is_ok());
    assert!(matches!(
        FileDiscovery::new(&path).max_bytes(10).get_nodes().await,
        Err(Error::FileTooLarge { limit: 10, .. })
    ));
}

#[tokio::test]
async fn number_of_entries_is_capped() {
    let dir = tempfile::tempdir().unwrap();
    let content: String = (1..=50).map(|i| format!("10.0.0.{i}:1\n")).collect();
    let path = write(&dir, "nodes.txt", &content);
    let got = FileDiscovery::new(&path)
        .max_peers(10)
        .get_nodes()
        .await
        .unwrap();
    assert_eq!(got.len(), 10);
    assert!(got.contains(&Peer::new(addr("10.0.0.10:1"))));
    assert!(!got.contains(&Peer::new(addr("10.0.0.11:1"))));
}

#[tokio::test]
async fn non_utf8_and_overlong_lines_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut content = b"\xEF\xBB\xBF10.0.0.1:1\n".to_vec(); // UTF-8 byte order mark
    content.extend_from_slice(b"10.0.0.\xff:1\n");
    content.extend_from_slice(format!("{}:1\n", "a".repeat(5000)).as_bytes());
    content.extend_from_slice(&[0u8; 100]);
    content.extend_from_slice(b"\n10.0.0.2:1\n");
    let path = write(&dir, "nodes.txt", &content);
    let got = FileDiscovery::new(&path).get_nodes().await.unwrap();
    assert_eq!(got, peers(&["10.0.0.1:1", "10.0.0.2:1"]));
}

#[tokio::test]
async fn strict_mode_reports_the_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "nodes.txt", "10.0.0.1:1\n# ok\n10.0.0.2\n");
    let mut d = FileDiscovery::new(&path).strict(true);
    match d.get_nodes().await {
        Err(Error::BadLine {
            line_no,
            line,
            reason,
            ..
        }) => {
            assert_eq!(line_no, 3);
            assert_eq!(line, "10.0.0.2");
            assert!(reason.contains("port"), "{reason}");
        }
        other => panic!("expected Error::BadLine, got {other:?}"),
    }
    // The same file is fine when not strict.
    let got = FileDiscovery::new(&path).get_nodes().await.unwrap();
    assert_eq!(got, peers(&["10.0.0.1:1"]));
}

#[tokio::test]
async fn repeated_polls_are_cheap_and_stable() {
    let dir = tempfile::tempdir().unwrap();
    let content: String = (0..1000)
        .map(|i| format!("10.0.{}.{}:4370\n", i / 250, i % 250 + 1))
        .collect();
    let path = write(&dir, "nodes.txt", &content);
    let mut d = FileDiscovery::new(&path);
    let start = Instant::now();
    let first = d.get_nodes().await.unwrap();
    for _ in 0..20 {
        assert_eq!(d.get_nodes().await.unwrap(), first);
    }
    assert_eq!(first.len(), 1000);
    assert!(start.elapsed() < Duration::from_secs(2));
}
