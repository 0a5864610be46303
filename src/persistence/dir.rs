//! The directory backend: one file per table, `<dir>/<table>.snap`, written atomically.
//!
//! Format (little endian): the magic `CETSSNAP`, a format version (`u32`, 1), the block count
//! (`u32`); then per block its length (`u32`), its CRC-32 (IEEE) and its bytes. A file is written
//! as `<name>.tmp`, fsynced, renamed over the old one, and the directory fsynced, so a crash
//! leaves either the old snapshot or the new one. Leftover `.tmp` files are removed on `load`.
//! The write-ahead log (`PersistOptions::sync_writes`) lives beside, in `wal.rs`.

use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::files::{crc32, err, read_err, sync_dir};
use super::wal::{self, Logs};
use super::{LogContents, Persistence};
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"CETSSNAP";
const VERSION: u32 = 1;
/// A block larger than this is taken for corruption (a length field gone wrong).
const MAX_BLOCK: u32 = 1 << 30;

/// Snapshots in a directory the user names; it is created if missing. No other setup.
/// It keeps a write-ahead log too (`PersistOptions::sync_writes`), one segment file per stretch
/// between two snapshots, `<dir>/<table>.<n>.wal`.
#[derive(Debug, Clone)]
pub struct DirectoryBackend {
    dir: PathBuf,
    logs: std::sync::Arc<Logs>,
}

impl DirectoryBackend {
    /// A backend writing into `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            logs: Default::default(),
        }
    }

    /// The file name of a table without extension (see [`DirectoryBackend::file_of`]).
    fn stem_of(&self, table: &str) -> String {
        let f = self.file_of(table);
        f.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Runs a blocking step of the log of `table` on the blocking pool.
    async fn log_step<T: Send + 'static>(
        &self,
        table: &str,
        step: impl FnOnce(&Path, &str, &Logs) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (dir, stem, logs) = (self.dir.clone(), self.stem_of(table), self.logs.clone());
        tokio::task::spawn_blocking(move || step(&dir, &stem, &logs))
            .await
            .map_err(|e| Error::Persistence {
                file: self.dir.display().to_string(),
                reason: format!("the log task failed: {e}"),
            })?
    }

    /// The file of a table: its name if it is made of ASCII letters, digits, `-` and `_`,
    /// otherwise its bytes in hex (a table name may hold any character).
    pub fn file_of(&self, table: &str) -> PathBuf {
        let plain = table
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        let stem = if plain {
            table.to_string()
        } else {
            let hex: String = table.bytes().map(|b| format!("{b:02x}")).collect();
            format!("x-{hex}")
        };
        self.dir.join(format!("{stem}.snap"))
    }
}

fn write_atomically(dir: &Path, file: &Path, blocks: &[Vec<u8>]) -> Result<u64> {
    std::fs::create_dir_all(dir).map_err(|e| err(dir, format!("cannot create: {e}")))?;
    let tmp = file.with_extension("snap.tmp");
    let mut bytes = 16u64;
    // Removes the temporary file if anything below fails (after the rename it is gone).
    let _tmp_guard = RemoveOnDrop(Some(tmp.clone()));
    {
        let f = std::fs::File::create(&tmp).map_err(|e| err(&tmp, e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        let count = u32::try_from(blocks.len()).map_err(|_| err(file, "too many blocks"))?;
        w.write_all(MAGIC).map_err(|e| err(&tmp, e))?;
        w.write_all(&VERSION.to_le_bytes())
            .map_err(|e| err(&tmp, e))?;
        w.write_all(&count.to_le_bytes())
            .map_err(|e| err(&tmp, e))?;
        for b in blocks {
            let len = u32::try_from(b.len())
                .ok()
                .filter(|l| *l <= MAX_BLOCK)
                .ok_or_else(|| err(file, "a block over 1 GiB"))?;
            w.write_all(&len.to_le_bytes()).map_err(|e| err(&tmp, e))?;
            w.write_all(&crc32(b).to_le_bytes())
                .map_err(|e| err(&tmp, e))?;
            w.write_all(b).map_err(|e| err(&tmp, e))?;
            bytes += 8 + u64::from(len);
        }
        let f = w.into_inner().map_err(|e| err(&tmp, e.error()))?;
        f.sync_all().map_err(|e| err(&tmp, e))?;
    }
    std::fs::rename(&tmp, file).map_err(|e| err(file, e))?;
    sync_dir(dir)?;
    Ok(bytes)
}

fn read(file: &Path) -> Result<Option<Vec<Vec<u8>>>> {
    let _ = std::fs::remove_file(file.with_extension("snap.tmp"));
    let data = match std::fs::read(file) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(file, e)),
    };
    parse(&data).map(Some).map_err(|reason| err(file, reason))
}

fn parse(data: &[u8]) -> std::result::Result<Vec<Vec<u8>>, String> {
    let u32_at = |at: usize| -> std::result::Result<u32, String> {
        data.get(at..at + 4)
            .and_then(|s| s.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| format!("truncated at byte {at} of {}", data.len()))
    };
    if data.get(..8) != Some(&MAGIC[..]) {
        return Err("not a cets snapshot (bad magic)".into());
    }
    let version = u32_at(8)?;
    if version != VERSION {
        return Err(format!(
            "format version {version}, this build reads {VERSION}"
        ));
    }
    let count = u32_at(12)?;
    let mut at = 16usize;
    let mut blocks = Vec::new();
    for i in 0..count {
        let len = u32_at(at)?;
        let crc = u32_at(at + 4)?;
        if len > MAX_BLOCK {
            return Err(format!("block {i} claims {len} bytes"));
        }
        let start = at + 8;
        let body = data
            .get(start..start + len as usize)
            .ok_or_else(|| format!("truncated in block {i} of {count}"))?;
        if crc32(body) != crc {
            return Err(format!("checksum mismatch in block {i} of {count}"));
        }
        blocks.push(body.to_vec());
        at = start + len as usize;
    }
    if at != data.len() {
        return Err(format!("{} bytes after the last block", data.len() - at));
    }
    Ok(blocks)
}

/// Removes a temporary file unless disarmed: a snapshot that fails half written (a full disk)
/// leaves no partial file holding the space.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[async_trait]
impl Persistence for DirectoryBackend {
    async fn save(&self, table: &str, blocks: Vec<Vec<u8>>) -> Result<u64> {
        let (dir, file) = (self.dir.clone(), self.file_of(table));
        tokio::task::spawn_blocking(move || write_atomically(&dir, &file, &blocks))
            .await
            .map_err(|e| Error::Persistence {
                file: self.dir.display().to_string(),
                reason: format!("the writer task failed: {e}"),
            })?
    }

    async fn load(&self, table: &str) -> Result<Option<Vec<Vec<u8>>>> {
        let file = self.file_of(table);
        tokio::task::spawn_blocking(move || read(&file))
            .await
            .map_err(|e| Error::Persistence {
                file: self.dir.display().to_string(),
                reason: format!("the reader task failed: {e}"),
            })?
    }

    fn has_log(&self) -> bool {
        true
    }

    async fn log_append(&self, table: &str, entries: Vec<Vec<u8>>) -> Result<u64> {
        self.log_step(table, move |d, s, l| wal::append(d, s, l, &entries))
            .await
    }

    async fn log_cut(&self, table: &str) -> Result<u64> {
        self.log_step(table, wal::cut).await
    }

    async fn log_drop(&self, table: &str, mark: u64) -> Result<u64> {
        self.log_step(table, move |d, s, l| wal::drop_upto(d, s, l, mark))
            .await
    }

    async fn log_load(&self, table: &str) -> Result<Vec<Vec<u8>>> {
        Ok(self.log_step(table, wal::load).await?.0)
    }

    async fn log_recover(&self, table: &str) -> Result<LogContents> {
        let (entries, torn) = self.log_step(table, wal::load).await?;
        Ok(LogContents::new(entries).torn_tails(torn))
    }

    async fn set_aside(&self, table: &str) -> Result<()> {
        let snap = self.file_of(table);
        self.log_step(table, move |d, s, l| wal::set_aside(d, s, l, &snap))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_file_is_an_error_that_says_where() {
        let dir = std::env::temp_dir().join(format!("cets-dir-{}", rand::random::<u64>()));
        let b = DirectoryBackend::new(&dir);
        let file = b.file_of("t");
        let blocks = vec![b"one".to_vec(), b"second block".to_vec()];
        write_atomically(&dir, &file, &blocks).unwrap();
        assert_eq!(read(&file).unwrap(), Some(blocks));
        let mut data = std::fs::read(&file).unwrap();
        let n = data.len();
        data[n - 2] ^= 1;
        assert!(parse(&data)
            .unwrap_err()
            .contains("checksum mismatch in block 1"));
        assert!(parse(&data[..n - 3])
            .unwrap_err()
            .contains("truncated in block 1"));
        assert!(parse(b"garbage").unwrap_err().contains("magic"));
        assert_eq!(b.file_of("a/b").file_name().unwrap(), "x-612f62.snap");
        let _ = std::fs::remove_dir_all(dir);
    }
}
