//! Per-record lifetimes (`Table::insert_with_ttl`): the lifetime is stored in the record
//! (`Rec::ttl`, milliseconds from the write's stamp) and travels with it in writes and join
//! dumps, so the newer-wins rule decides a refresh like any other write.

use std::time::Duration;

use crate::{Error, Result};

/// Every table's records are swept of expired per-record lifetimes this often, once one was
/// stored (`Shared::record_ttl`).
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The lifetime in milliseconds, checked: at least 1 ms, at most `u32::MAX` ms (the field fits
/// in the padding of a record).
pub(crate) fn millis(ttl: Duration) -> Result<u32> {
    let ms = ttl.as_millis();
    if ms == 0 {
        return Err(Error::Config("a record's ttl must be at least 1 ms".into()));
    }
    u32::try_from(ms).map_err(|_| {
        Error::Config(format!(
            "a record's ttl may be at most {} ms (49.7 days)",
            u32::MAX
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ttl_is_one_millisecond_to_u32_max_milliseconds() {
        assert!(millis(Duration::from_micros(999)).is_err());
        assert_eq!(millis(Duration::from_millis(1)).unwrap(), 1);
        assert_eq!(
            millis(Duration::from_millis(u64::from(u32::MAX))).unwrap(),
            u32::MAX
        );
        assert!(millis(Duration::from_millis(u64::from(u32::MAX) + 1)).is_err());
    }
}
