//! The write-ahead log of the directory backend (`PersistOptions::sync_writes`).
//!
//! A table's log is a sequence of segment files `<dir>/<table>.<n>.wal` (`n` a 20-digit
//! number that grows by one per segment). A segment starts with the magic `CETSWAL1`; then per
//! entry its length (`u32`, little endian), its CRC-32 and its bytes. An append writes every
//! entry of a batch with one `write` and one fsync (group commit); if it fails, the segment is
//! cut back to its length before the batch, so a full disk leaves no half entry behind. A cut
//! closes the open segment (the next append opens a new one, and fsyncs the directory); a drop
//! removes the segments a snapshot covers. A start never appends to a segment of an earlier
//! run. At load, an incomplete entry at the end of the newest segment with nothing valid after
//! it (an append a crash interrupted, never acknowledged) is cut off with a warning, and so is
//! a last entry whose checksum fails because only zero bytes follow a sector boundary inside it
//! (sectors a power loss left unwritten); any other damage (a bad magic, a complete entry whose
//! checksum fails, an incomplete entry in an older segment or before a valid one) is an error
//! naming the file.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::files::{crc32, err, read_err, sync_dir};
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
        Err(e) => return Err(read_err(dir, e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| read_err(dir, e))?;
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
            .filter(|l| *l > 0 && *l <= MAX_ENTRY)
            .ok_or_else(|| {
                err(
                    &segment(dir, stem, *n),
                    "an empty log entry or one over 1 GiB",
                )
            })?;
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

/// Every entry of the log of `stem`, oldest first, and the number of torn tails cut off.
///
/// A torn tail is an incomplete entry at the end of the newest segment with nothing valid after
/// it (or one whose sectors from some point on were never written and read as zeros): an
/// append that a crash interrupted before its fsync returned, so never acknowledged. It
/// is cut off the file (logged as a warning naming the file) and the entries before it are
/// returned. Any other damage (a complete entry whose checksum fails, an incomplete entry in an
/// older segment or followed by a valid one, a bad magic) is an error naming the segment.
pub(super) fn load(dir: &Path, stem: &str, logs: &Logs) -> Result<(Vec<Vec<u8>>, u64)> {
    let segs = segments(dir, stem)?;
    let mut out = Vec::new();
    let mut torn_tails = 0;
    for (i, (_, path, _)) in segs.iter().enumerate() {
        let data = std::fs::read(path).map_err(|e| read_err(path, e))?;
        let Torn { at, why } = match parse(&data, &mut out).map_err(|reason| err(path, reason))? {
            None => continue,
            Some(torn) => torn,
        };
        if i + 1 < segs.len() {
            return Err(err(
                path,
                format!("{why}, in a segment that is not the newest (damage, not a crash)"),
            ));
        }
        cut_tail(path, at, data.len())?;
        tracing::warn!(
            file = %path.display(),
            bytes = data.len() - at,
            at,
            "the log ends in an incomplete entry (an append a crash interrupted, never \
             acknowledged): cut it off"
        );
        torn_tails += 1;
    }
    let mut all = logs.lock().unwrap_or_else(|p| p.into_inner());
    let st = all.entry(stem.to_string()).or_default();
    st.listed = false;
    list(dir, stem, st)?;
    Ok((out, torn_tails))
}

/// Renames the snapshot `snap` (if any) and every segment of `stem` with the suffix
/// `.damaged-<unix ms>`, which neither a load nor a listing reads, and forgets the open
/// segment: the next append starts a new one.
pub(super) fn set_aside(dir: &Path, stem: &str, logs: &Logs, snap: &Path) -> Result<()> {
    let mut all = logs.lock().unwrap_or_else(|p| p.into_inner());
    let st = all.entry(stem.to_string()).or_default();
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let aside = |p: &Path| -> Result<()> {
        let mut name = p.as_os_str().to_owned();
        name.push(format!(".damaged-{ms}"));
        std::fs::rename(p, &name).map_err(|e| err(p, format!("cannot set it aside: {e}")))
    };
    if snap.exists() {
        aside(snap)?;
    }
    for (_, path, _) in segments(dir, stem)? {
        aside(&path)?;
    }
    *st = LogState::default();
    sync_dir(dir)
}

/// Cuts a segment back to its first `at` bytes (a segment without its whole magic is removed)
/// and makes that durable, so a later start, for which this segment is no longer the newest,
/// does not find the incomplete entry.
fn cut_tail(path: &Path, at: usize, len: usize) -> Result<()> {
    let why = |e: std::io::Error| {
        err(
            path,
            format!("cannot cut the torn tail ({len} bytes to {at}): {e}"),
        )
    };
    if at < MAGIC.len() {
        std::fs::remove_file(path).map_err(why)?;
        return path.parent().map_or(Ok(()), sync_dir);
    }
    let f = File::options().write(true).open(path).map_err(why)?;
    f.set_len(at as u64)
        .and_then(|()| f.sync_all())
        .map_err(why)
}

/// Where a segment's last entry is incomplete (`parse`).
#[derive(Debug, PartialEq)]
struct Torn {
    /// The byte the incomplete entry starts at (the valid prefix's length).
    at: usize,
    /// What is incomplete, for the log line and for errors.
    why: String,
}

/// Parses one segment into `out`. `Ok(None)`: it ends after a complete entry. `Ok(Some(torn))`:
/// it ends in an incomplete entry (a header cut short, a body shorter than its length, only
/// zero bytes where an entry should start, or an entry whose checksum fails because the file
/// holds only zero bytes from a sector boundary inside it to its end: `unwritten_from`) and no
/// valid entry starts after it: an append a crash interrupted. `Err`: corruption (a bad magic,
/// any other complete entry whose checksum fails, a length no entry has, an incomplete entry
/// followed by a valid one).
fn parse(data: &[u8], out: &mut Vec<Vec<u8>>) -> std::result::Result<Option<Torn>, String> {
    if data.len() < MAGIC.len() && MAGIC.starts_with(data) {
        let why = format!("a segment of {} bytes, its magic incomplete", data.len());
        return Ok(Some(Torn { at: 0, why }));
    }
    if data.get(..8) != Some(&MAGIC[..]) {
        return Err("not a cets log segment (bad magic)".into());
    }
    let mut at = 8usize;
    let mut i = 0usize;
    while at < data.len() {
        let torn = match entry_at(data, at) {
            Entry::Valid(body) => {
                out.push(body.to_vec());
                at += 8 + body.len();
                i += 1;
                continue;
            }
            Entry::Corrupt(why) => match unwritten_from(data, at) {
                Some(z) => format!(
                    "entry {i} at byte {at} of {}: {why}, only zero bytes from byte {z} on",
                    data.len()
                ),
                None => return Err(format!("entry {i} at byte {at}: {why}")),
            },
            Entry::Incomplete(why) => format!("entry {i} at byte {at} of {}: {why}", data.len()),
        };
        return match (at + 1..data.len()).find(|p| valid_at(data, *p)) {
            Some(p) => Err(format!("{torn}, but a valid entry follows at byte {p}")),
            None => Ok(Some(Torn { at, why: torn })),
        };
    }
    Ok(None)
}

/// The smallest unit a disk writes: a crash leaves each one whole or not written.
const SECTOR: usize = 512;

/// Where the unwritten end of a segment starts, if the entry at byte `at` reaches into it:
/// the file holds only zero bytes from a sector boundary inside that entry (after its first
/// byte, before its end) to its end. A crash (a power loss) can leave a file extended over
/// sectors whose bytes never reached the disk, and they read as zeros: the entry then has its
/// whole length and fails its checksum, but it is an append never acknowledged, not damage.
fn unwritten_from(data: &[u8], at: usize) -> Option<usize> {
    // Only an entry of a length an append writes, complete in the file (its checksum failed):
    // zeros never make a length of 0 or over `MAX_ENTRY` out of one.
    let len = u32_at(data, at).filter(|l| *l > 0 && *l <= MAX_ENTRY)? as usize;
    let end = at.checked_add(8 + len).filter(|e| *e <= data.len())?;
    let zeros = data.iter().rev().take_while(|b| **b == 0).count();
    let z = data.len() - zeros;
    (zeros > 0 && z > at && z < end && z.is_multiple_of(SECTOR)).then_some(z)
}

enum Entry<'a> {
    Valid(&'a [u8]),
    /// Ends before the file does (or only zero bytes follow): what is missing.
    Incomplete(String),
    Corrupt(String),
}

/// The entry that starts at byte `at` of `data`.
fn entry_at(data: &[u8], at: usize) -> Entry<'_> {
    let rest = &data[at.min(data.len())..];
    let (Some(len), Some(crc)) = (u32_at(rest, 0), u32_at(rest, 4)) else {
        return Entry::Incomplete(format!("a header of {} of 8 bytes", rest.len()));
    };
    if len == 0 {
        // An append never writes an empty entry; zeros to the end are an extension of the file
        // whose bytes never reached the disk.
        return if rest.iter().all(|b| *b == 0) {
            Entry::Incomplete(format!("{} zero bytes to the end", rest.len()))
        } else {
            Entry::Corrupt("a length of 0 bytes".into())
        };
    }
    if len > MAX_ENTRY {
        return Entry::Corrupt(format!("a length of {len} bytes"));
    }
    let Some(body) = rest.get(8..8 + len as usize) else {
        return Entry::Incomplete(format!("{} of its {len} bytes", rest.len() - 8));
    };
    if crc32(body) != crc {
        return Entry::Corrupt("checksum mismatch".into());
    }
    Entry::Valid(body)
}

/// Whether a valid entry starts at byte `at` (cheap for most bytes: a length of 0 or past the
/// end is rejected before any checksum).
fn valid_at(data: &[u8], at: usize) -> bool {
    let fits = u32_at(data, at)
        .is_some_and(|len| len > 0 && len <= MAX_ENTRY && at + 8 + len as usize <= data.len());
    fits && matches!(entry_at(data, at), Entry::Valid(_))
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    data.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> PathBuf {
        std::env::temp_dir().join(format!("cets-wal-{}", rand::random::<u64>()))
    }

    /// A segment holding `entries`, as `append` writes it.
    fn seg(entries: &[&[u8]]) -> Vec<u8> {
        let mut d = MAGIC.to_vec();
        for e in entries {
            d.extend_from_slice(&(e.len() as u32).to_le_bytes());
            d.extend_from_slice(&crc32(e).to_le_bytes());
            d.extend_from_slice(e);
        }
        d
    }

    fn parsed(data: &[u8]) -> (Vec<Vec<u8>>, std::result::Result<Option<Torn>, String>) {
        let mut out = Vec::new();
        let r = parse(data, &mut out);
        (out, r)
    }

    #[test]
    fn appends_cuts_and_drops() {
        let dir = tmp();
        let logs = Logs::default();
        append(&dir, "t", &logs, &[b"a".to_vec(), b"bb".to_vec()]).unwrap();
        let mark = cut(&dir, "t", &logs).unwrap();
        let bytes = append(&dir, "t", &logs, &[b"ccc".to_vec()]).unwrap();
        assert_eq!(bytes, 8 + 9 + 10 + 8 + 11);
        let (all, torn) = load(&dir, "t", &Logs::default()).unwrap();
        assert_eq!(all, vec![b"a".to_vec(), b"bb".to_vec(), b"ccc".to_vec()]);
        assert_eq!(torn, 0);
        assert_eq!(drop_upto(&dir, "t", &logs, mark).unwrap(), 8 + 11);
        assert_eq!(load(&dir, "t", &logs).unwrap().0, vec![b"ccc".to_vec()]);
        // A later start opens a new segment, never appends to an old one.
        append(&dir, "t", &Logs::default(), &[b"d".to_vec()]).unwrap();
        assert_eq!(segments(&dir, "t").unwrap().len(), 2);
        // No empty entry is written: the reader takes a length of 0 for damage.
        assert!(append(&dir, "t", &logs, &[Vec::new()]).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_incomplete_last_entry_with_nothing_valid_after_it_is_a_torn_tail() {
        let whole = seg(&[b"first", b"second entry"]);
        let second_at = 8 + 8 + 5;
        // Cut anywhere inside the last entry: its header or its body.
        for cut in second_at + 1..whole.len() {
            let (out, r) = parsed(&whole[..cut]);
            assert_eq!(out, vec![b"first".to_vec()], "cut at {cut}");
            assert_eq!(r.unwrap().map(|t| t.at), Some(second_at), "cut at {cut}");
        }
        // Cut exactly between entries: nothing is torn.
        assert_eq!(parsed(&whole[..second_at]).1, Ok(None));
        // Zero bytes where the next entry should start: an extension never written.
        let mut zeros = whole.clone();
        zeros.extend([0u8; 100]);
        let (out, r) = parsed(&zeros);
        assert_eq!(out.len(), 2);
        assert_eq!(r.unwrap().map(|t| t.at), Some(whole.len()));
        // A segment whose magic a crash cut short.
        for n in 0..8 {
            assert_eq!(parsed(&MAGIC[..n]).1.unwrap().map(|t| t.at), Some(0));
        }
    }

    #[test]
    fn a_last_entry_whose_end_a_power_loss_left_as_zeros_is_a_torn_tail() {
        // The second entry spans bytes 21..1529; the file was extended over it, but only its
        // first sector reached the disk: zeros from byte 512 on, past its end too.
        let big = vec![0xabu8; 1500];
        let whole = seg(&[b"first", &big]);
        let second_at = 8 + 8 + 5;
        for (zeros_from, extra) in [(512, 0), (512, 3000), (1024, 100)] {
            let mut d = whole.clone();
            d[zeros_from..].fill(0);
            d.extend(std::iter::repeat_n(0u8, extra));
            let (out, r) = parsed(&d);
            assert_eq!(out, vec![b"first".to_vec()], "zeros from {zeros_from}");
            let torn = r.unwrap().expect("a torn tail");
            assert_eq!(torn.at, second_at);
            assert!(
                torn.why.contains("only zero bytes from byte"),
                "{}",
                torn.why
            );
        }
        // Zeros from a byte that is no sector boundary: damage (a write never leaves that).
        let mut d = whole.clone();
        d[700..].fill(0);
        assert!(parsed(&d).1.unwrap_err().contains("checksum mismatch"));
        // A length of 0, then a checksum's bytes up to a sector boundary, then zeros: no
        // append writes a length of 0, and zeros do not make one out of another: damage.
        let mut d = seg(&[&[1u8; 512 - 7 - 16]]);
        d.extend([0, 0, 0, 0, 7, 7, 7]);
        assert_eq!(d.len(), 512);
        d.resize(1024, 0);
        assert!(parsed(&d).1.unwrap_err().contains("length of 0"));
        // A damaged last entry that ends at a sector boundary, zeros only after it: every
        // sector of it was written, so it is damage.
        let mut d = seg(&[b"first", &vec![0xabu8; 1024 - 29]]);
        assert_eq!(d.len(), 1024);
        d[600] ^= 1;
        d.extend([0u8; 512]);
        assert!(parsed(&d).1.unwrap_err().contains("entry 1"));
    }

    #[test]
    fn a_complete_entry_that_fails_its_checksum_or_damage_before_valid_entries_is_corruption() {
        let whole = seg(&[b"first", b"second entry", b"third"]);
        // A byte of the middle entry's body flipped.
        let mut flipped = whole.clone();
        flipped[8 + 13 + 8 + 3] ^= 0x40;
        let e = parsed(&flipped).1.unwrap_err();
        assert!(
            e.contains("entry 1") && e.contains("checksum mismatch"),
            "{e}"
        );
        // The last entry, complete, but damaged: corruption too.
        let mut last = whole.clone();
        let n = last.len();
        last[n - 1] ^= 1;
        assert!(parsed(&last).1.unwrap_err().contains("entry 2"));
        // A length that runs past the end while valid entries follow: not a torn tail.
        let mut long = whole.clone();
        long[8 + 13] = 0xff;
        long[8 + 13 + 1] = 0x10;
        let e = parsed(&long).1.unwrap_err();
        assert!(
            e.contains("entry 1") && e.contains("a valid entry follows"),
            "{e}"
        );
        // A length of zero before non-zero bytes.
        let mut zero_len = whole.clone();
        zero_len[8 + 13..8 + 13 + 4].copy_from_slice(&[0; 4]);
        assert!(parsed(&zero_len).1.unwrap_err().contains("length of 0"));
        assert!(parsed(b"garbage!....").1.unwrap_err().contains("magic"));
    }

    #[test]
    fn load_cuts_the_torn_tail_of_the_newest_segment_only() {
        let dir = tmp();
        let logs = Logs::default();
        append(&dir, "t", &logs, &[b"a".to_vec()]).unwrap();
        cut(&dir, "t", &logs).unwrap();
        append(&dir, "t", &logs, &[b"bb".to_vec(), b"ccc".to_vec()]).unwrap();
        let segs = segments(&dir, "t").unwrap();
        let (old, new) = (&segs[0].1, &segs[1].1);
        let data = std::fs::read(new).unwrap();
        std::fs::write(new, &data[..data.len() - 2]).unwrap();
        let (all, torn) = load(&dir, "t", &Logs::default()).unwrap();
        assert_eq!((all, torn), (vec![b"a".to_vec(), b"bb".to_vec()], 1));
        // The tail is cut on disk: the next start (for which that segment is no longer the
        // newest) finds no damage.
        assert_eq!(std::fs::read(new).unwrap(), seg(&[b"bb"]));
        let logs = Logs::default();
        append(&dir, "t", &logs, &[b"dddd".to_vec()]).unwrap();
        assert_eq!(load(&dir, "t", &logs).unwrap().1, 0);
        // An incomplete entry in an older segment is damage, named by its file.
        let data = std::fs::read(old).unwrap();
        std::fs::write(old, &data[..data.len() - 1]).unwrap();
        let e = load(&dir, "t", &logs).unwrap_err().to_string();
        assert!(
            e.contains(&old.display().to_string()) && e.contains("not the newest"),
            "{e}"
        );
        // A newest segment a crash left empty (created, magic not yet written) is removed.
        std::fs::write(old, &data).unwrap();
        let empty = segment(&dir, "t", 99);
        std::fs::write(&empty, b"").unwrap();
        let (all, torn) = load(&dir, "t", &logs).unwrap();
        assert_eq!((all.len(), torn), (3, 1));
        assert!(!empty.exists());
        let _ = std::fs::remove_dir_all(dir);
    }
}
