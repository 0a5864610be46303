//! What the file backends share: errors that name their file, the fsync of a directory, and
//! the checksum of their records.

use std::path::Path;

use crate::{Error, Result};

/// A persistence error about `file`.
pub(super) fn err(file: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Persistence {
        file: file.display().to_string(),
        reason: reason.to_string(),
    }
}

/// A failed read of `file`: [`Error::PersistenceUnavailable`] when this process may not read
/// it (the files are likely intact: an operator fixes the permission), else a persistence
/// error about the file.
pub(super) fn read_err(file: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        Error::PersistenceUnavailable {
            store: file.display().to_string(),
            reason: e.to_string(),
        }
    } else {
        err(file, e)
    }
}

/// Fsyncs a directory, so that the files created, renamed or removed in it stay so.
pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| err(dir, format!("fsync of the directory: {e}")))
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), bitwise per byte with a small table.
pub(super) fn crc32(data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    const TABLE: [u32; 256] = table();
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_refused_for_permission_is_unavailable_and_any_other_failure_is_an_error_of_the_file()
    {
        let f = Path::new("/d/t.snap");
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert!(matches!(
            read_err(f, denied),
            Error::PersistenceUnavailable { store, .. } if store == "/d/t.snap"
        ));
        let eio = std::io::Error::other("input/output error");
        assert!(matches!(
            read_err(f, eio),
            Error::Persistence { file, .. } if file == "/d/t.snap"
        ));
    }

    #[test]
    fn crc32_of_a_known_string() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }
}
