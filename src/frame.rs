//! Frames: a `u32` little-endian length, then a postcard-encoded message.
//!
//! The reader refuses a length above the configured limit before it allocates anything, so a
//! peer cannot make a node buffer more than one frame of `max_frame_size` per stream.

use bytes::{Buf, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Error, Result};

/// Bytes of the length prefix.
pub(crate) const PREFIX: usize = 4;

/// Encodes one message as a frame (length prefix included).
pub(crate) fn encode<T: Serialize + ?Sized>(msg: &T) -> Result<Bytes> {
    let mut buf = Vec::with_capacity(64);
    buf.extend_from_slice(&[0; PREFIX]);
    let mut buf = postcard::to_extend(msg, buf)?;
    let len = u32::try_from(buf.len() - PREFIX).map_err(|_| Error::FrameTooLarge {
        size: buf.len(),
        limit: u32::MAX as usize,
    })?;
    buf[..PREFIX].copy_from_slice(&len.to_le_bytes());
    Ok(Bytes::from(buf))
}

/// Decodes the body of a frame (without its prefix).
pub(crate) fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    Ok(postcard::from_bytes(body)?)
}

/// Reads frames from one QUIC receive stream.
pub(crate) struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
    limit: usize,
    /// Run when the reader is dropped (the connection's count of live table streams).
    on_drop: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Drop for FrameReader {
    fn drop(&mut self) {
        if let Some(f) = self.on_drop.take() {
            f();
        }
    }
}

/// A frame's buffer grows by at most this much ahead of the bytes that arrived: a prefix that
/// announces a large frame reserves memory as the frame comes, not at once.
const GROW_AHEAD: usize = 1024 * 1024;

impl FrameReader {
    pub(crate) fn new(recv: quinn::RecvStream, limit: usize) -> Self {
        Self {
            recv,
            // Small while only a header is expected (many streams may be opened at once).
            buf: BytesMut::with_capacity(limit.min(64 * 1024)),
            limit,
            on_drop: None,
        }
    }

    /// The next frame's body; `None` when the peer finished the stream between two frames.
    pub(crate) async fn next(&mut self) -> Result<Option<Bytes>> {
        loop {
            if self.buf.len() >= PREFIX {
                let mut prefix = [0u8; PREFIX];
                prefix.copy_from_slice(&self.buf[..PREFIX]);
                let len = u32::from_le_bytes(prefix) as usize;
                if len > self.limit {
                    return Err(Error::FrameTooLarge {
                        size: len,
                        limit: self.limit,
                    });
                }
                if self.buf.len() >= PREFIX + len {
                    self.buf.advance(PREFIX);
                    return Ok(Some(self.buf.split_to(len).freeze()));
                }
                self.buf
                    .reserve((PREFIX + len - self.buf.len()).min(GROW_AHEAD));
            }
            match self.recv.read_chunk(256 * 1024, true).await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.bytes),
                Ok(None) if self.buf.is_empty() => return Ok(None),
                Ok(None) => return Err(Error::Transport("stream ended inside a frame".into())),
                Err(e) => return Err(Error::Transport(format!("read: {e}"))),
            }
        }
    }

    /// Changes the largest frame accepted from now on.
    pub(crate) fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// Runs `f` when this reader is dropped.
    pub(crate) fn on_drop(&mut self, f: impl FnOnce() + Send + Sync + 'static) {
        self.on_drop = Some(Box::new(f));
    }

    /// Tells the sender to stop with an application code.
    pub(crate) fn stop(&mut self, code: u32) {
        let _ = self.recv.stop(quinn::VarInt::from_u32(code));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let f = encode(&("hello", 42u64)).unwrap();
        let len = u32::from_le_bytes([f[0], f[1], f[2], f[3]]) as usize;
        assert_eq!(len, f.len() - PREFIX);
        let (s, n): (String, u64) = decode(&f[PREFIX..]).unwrap();
        assert_eq!((s.as_str(), n), ("hello", 42));
        assert!(decode::<(String, u64)>(&[0xff, 0xff]).is_err());
    }
}
