//! The write-ahead log of the directory backend (`PersistOptions::sync_writes`).
//!
//! A table's log is a sequence of segment files `<dir>/<table>.<n>.wal` (`n` a 20-digit
//! number that grows by one per segment). A segment starts with the magic `CETSWAL1`; then per
//! entry its length (`u32`, little endian), its CRC-32 and its bytes. An append writes every
//! entry of a batch with one `write` and one fsync (group commit); if it fails, the segment is
//! cut back to its length before the batch, so a full disk leaves no half entry behind. A cut
//! closes the open segment (the next append opens a new one, and fsyncs the directory); a drop
//! removes the segments a snapshot covers. A start never appends to a segment of an earlier
//! run. A segment with a bad magic, a truncated entry or a checksum mismatch is an error
//! naming the file.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::dir::{crc32, err, sync_dir};
use crate::Result;

const MAGIC: &[u8; 8] = b"CETSWAL1";
/// An entry larger than this is taken for corruption.
const MAX_ENTRY: u32 = 1 << 30;

/// The log of one table as this process knows it.
#[derive(Debug, Default)]
pub(super) struct LogState {
    /// Whether the directory was listed (`max_seg`, `bytes` are known).
    listed: bool,
    /// The highest segment number in the directory.
    max_seg: u64,
    /// The open segment: its number, file and length.
    open: Option<(u64, File, u64)>,
    /// Bytes of every segment of the table.
    bytes: u64,
}

/// The logs of a backend's tables, by file stem.
pub(super) type Logs = std::sync::Mutex<HashMap<String, LogState>>;

fn segment(dir: &Path, stem: &str, n: u64) -> PathBuf {
    dir.join(format!("{stem}.{n:020}.wal"))
}

/// The segments of `stem` in `dir`, oldest first, with their sizes.
fn segments(dir: &Path, stem: &str) -> Result<Vec<(u64, PathBuf, u64)>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err(dir, e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| err(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(n) = name
            .strip_suffix(".wal")
            .and_then(|r| r.strip_prefix(stem))
            .and_then(|r| r.strip_prefix('.'))
            .filter(|r| r.len() == 20)
            .and_then(|r| r.parse::<u64>().ok())
        else {
            continue;
        };
        let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
        out.push((n, entry.path(), len));
    }
    out.sort_by_key(|(n, _, _)| *n);
    Ok(out)
}

fn list(dir: &Path, stem: &str, st: &mut LogState) -> Result<()> {
    if !st.listed {
        let segs = segments(dir, stem)?;
        st.max_seg = segs.last().map_or(0, |(n, _, _)| *n);
        st.bytes = segs.iter().map(|(_, _, l)| l).sum();
        st.listed = true;
    }
    Ok(())
}

/// Appends `entries` to the log of `stem` and fsyncs it; returns the log's bytes.
pub(super) fn append(dir: &Path, stem: &str, logs: &Logs, entries: &[Vec<u8>]) -> Result<u64> {
    let mut all = logs.lock().unwrap_or_else(|p| p.into_inner());
    let st = all.entry(stem.to_string()).or_default();
    list(dir, stem, st)?;
    if st.open.is_none() {
        std::fs::create_dir_all(dir).map_err(|e| err(dir, format!("cannot create: {e}")))?;
        let n = st.max_seg + 1;
        let path = segment(dir, stem, n);
        let mut f = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| err(&path, e))?;
        if let Err(e) = f.write_all(MAGIC).and_then(|()| f.sync_data()) {
            drop(f);
            let _ = std::fs::remove_file(&path);
            return Err(err(&path, e));
        }
        sync_dir(dir)?;
        st.max_seg = n;
        st.bytes += MAGIC.len() as u64;
        st.open = Some((n, f, MAGIC.len() as u64));
    }
    let Some((n, f, len)) = &mut st.open else {
        return Ok(st.bytes);
    };
    let mut buf = Vec::with_capacity(entries.iter().map(|e| e.len() + 8).sum());
    for e in entries {
        let l = u32::try_from(e.len())
            .ok()
            .filter(|l| *l <= MAX_ENTRY)
            .ok_or_else(|| err(&segment(dir, stem, *n), "a log entry over 1 GiB"))?;
        buf.extend_from_slice(&l.to_le_bytes());
        buf.extend_from_slice(&crc32(e).to_le_bytes());
        buf.extend_from_slice(e);
    }
    if let Err(e) = f.write_all(&buf).and_then(|()| f.sync_data()) {
        // No half entry stays behind (a full disk): the segment is cut back to what it held;
        // if even that fails, the next append starts a new segment.
        let path = segment(dir, stem, *n);
        if f.set_len(*len).is_err() {
            st.open = None;
        }
        return Err(err(&path, e));
    }
    *len += buf.len() as u64;
    st.bytes += buf.len() as u64;
    Ok(st.bytes)
}

/// Closes the open segment; returns the highest segment number that holds entries so far.
pub(super) fn cut(dir: &Path, stem: &str, logs: &Logs) -> Result<u64> {
    let mut all = logs.lock().unwrap_or_else(|p| p.into_inner());
    let st = all.entry(stem.to_string()).or_default();
    list(dir, stem, st)?;
    st.open = None;
    Ok(st.max_seg)
}

/// Removes the segments numbered up to `mark`; returns the log's bytes.
pub(super) fn drop_upto(dir: &Path, stem: &str, logs: &Logs, mark: u64) -> Result<u64> {
    let mut all = logs.lock().unwrap_or_else(|p| p.into_inner());
    let st = all.entry(stem.to_string()).or_default();
    let open = st.open.as_ref().map(|(n, _, _)| *n);
    let mut removed = false;
    for (n, path, _) in segments(dir, stem)? {
        if n <= mark && Some(n) != open {
            std::fs::remove_file(&path).map_err(|e| err(&path, e))?;
            removed = true;
        }
    }
    if removed {
        sync_dir(dir)?;
    }
    st.bytes = segments(dir, stem)?.iter().map(|(_, _, l)| l).sum();
    Ok(st.bytes)
}

/// Every entry of the log of `stem`, oldest first.
pub(super) fn load(dir: &Path, stem: &str, logs: &Logs) -> Result<Vec<Vec<u8>>> {
    let segs = segments(dir, stem)?;
    let mut out = Vec::new();
    for (_, path, _) in &segs {
        let data = std::fs::read(path).map_err(|e| err(path, e))?;
        parse(&data, &mut out).map_err(|reason| err(path, reason))?;
    }
    let mut all = logs.lock().unwrap_or_else(|p| p.into_inner());
    let st = all.entry(stem.to_string()).or_default();
    st.listed = false;
    list(dir, stem, st)?;
    Ok(out)
}

fn parse(data: &[u8], out: &mut Vec<Vec<u8>>) -> std::result::Result<(), String> {
    if data.get(..8) != Some(&MAGIC[..]) {
        return Err("not a cets log segment (bad magic)".into());
    }
    let u32_at = |at: usize| -> std::result::Result<u32, String> {
        data.get(at..at + 4)
            .and_then(|s| s.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| format!("truncated at byte {at} of {}", data.len()))
    };
    let mut at = 8usize;
    let mut i = 0usize;
    while at < data.len() {
        let len = u32_at(at)?;
        let crc = u32_at(at + 4)?;
        if len > MAX_ENTRY {
            return Err(format!("entry {i} claims {len} bytes"));
        }
        let start = at + 8;
        let body = data
            .get(start..start + len as usize)
            .ok_or_else(|| format!("truncated in entry {i} (at byte {at} of {})", data.len()))?;
        if crc32(body) != crc {
            return Err(format!("checksum mismatch in entry {i} (at byte {at})"));
        }
        out.push(body.to_vec());
        at = start + len as usize;
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_cuts_drops_and_damage() {
        let dir = std::env::temp_dir().join(format!("cets-wal-{}", rand::random::<u64>()));
        let logs = Logs::default();
        append(&dir, "t", &logs, &[b"a".to_vec(), b"bb".to_vec()]).unwrap();
        let mark = cut(&dir, "t", &logs).unwrap();
        let bytes = append(&dir, "t", &logs, &[b"ccc".to_vec()]).unwrap();
        assert_eq!(bytes, 8 + 9 + 10 + 8 + 11);
        assert_eq!(
            load(&dir, "t", &Logs::default()).unwrap(),
            vec![b"a".to_vec(), b"bb".to_vec(), b"ccc".to_vec()]
        );
        assert_eq!(drop_upto(&dir, "t", &logs, mark).unwrap(), 8 + 11);
        assert_eq!(load(&dir, "t", &logs).unwrap(), vec![b"ccc".to_vec()]);
        // A later start opens a new segment, never appends to an old one.
        append(&dir, "t", &Logs::default(), &[b"d".to_vec()]).unwrap();
        assert_eq!(segments(&dir, "t").unwrap().len(), 2);
        let (_, last, _) = segments(&dir, "t").unwrap().pop().unwrap();
        let mut data = std::fs::read(&last).unwrap();
        data.pop();
        std::fs::write(&last, &data).unwrap();
        let e = load(&dir, "t", &logs).unwrap_err().to_string();
        assert!(
            e.contains("truncated in entry 0") && e.contains(".wal"),
            "{e}"
        );
        data.push(0);
        let n = data.len();
        data[n - 1] ^= 0xff;
        std::fs::write(&last, &data).unwrap();
        let e = load(&dir, "t", &logs).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
