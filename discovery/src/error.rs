//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while asking a discovery backend for peers.
///
/// Discovery never panics: a missing file, a malformed line, an unknown DNS name or a
/// nameserver that does not answer all come back as one of these variants, and the
/// caller (usually a node's discovery poller) logs it and tries again later.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A nodes file could not be read (missing, unreadable, ...).
    #[error("cannot read nodes file {}: {source}", path.display())]
    Io {
        /// The file that was being read.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A nodes file is not a regular file (a directory, a FIFO, a device, ...).
    #[error("nodes file {} is not a regular file", path.display())]
    NotAFile {
        /// The offending path.
        path: PathBuf,
    },

    /// A nodes file is larger than the limit the backend accepts.
    #[error("nodes file {} is larger than the limit of {limit} bytes", path.display())]
    FileTooLarge {
        /// The offending file.
        path: PathBuf,
        /// The limit in bytes.
        limit: u64,
    },

    /// A line of a nodes file is not a valid `host:port` entry.
    ///
    /// By default bad lines are only logged and skipped; this error is returned for them
    /// only by a [`FileDiscovery`](crate::FileDiscovery) in strict mode.
    #[error("{}:{line_no}: {reason}: {line:?}", path.display())]
    BadLine {
        /// The file the line comes from.
        path: PathBuf,
        /// The line number, starting at 1.
        line_no: usize,
        /// The line (trimmed, and shortened if very long).
        line: String,
        /// Why the line was rejected.
        reason: String,
    },

    /// A host name could not be resolved by the system resolver.
    #[error("cannot resolve host {host:?}: {source}")]
    Resolve {
        /// The host name (with its port) that was looked up.
        host: String,
        /// The underlying error from the system resolver.
        #[source]
        source: std::io::Error,
    },

    /// A DNS query failed: the name does not exist (NXDOMAIN), the server refused or
    /// failed the query, the name is malformed, or the resolver could not be configured.
    #[error("DNS error: {0}")]
    Dns(String),

    /// A lookup did not complete within its timeout.
    #[error("discovery lookup timed out")]
    Timeout,
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
