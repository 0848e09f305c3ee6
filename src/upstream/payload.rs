//! A request body as it arrived: the chunks as read, never copied into one buffer, and their
//! SHA-256 computed while they arrived, which SigV4 needs as the payload hash.
//!
//! For a 500 KB Claude Code context this saves a copy of the whole body (and the page faults
//! of a fresh 500 KB buffer), and the hash is done by the time the last byte is in. A body a
//! front rewrites before it goes anywhere (a Messages body) is read unhashed; its hash is only
//! made if something asks for it.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use sha2::{Digest, Sha256};

use crate::inflight::Reservation;

/// A complete request body and its SHA-256 (lowercase hex). Cloning shares the chunks.
#[derive(Debug, Clone)]
pub struct Payload {
    chunks: Vec<Bytes>,
    len: u64,
    /// Made while the body arrived, or on first use for one read unhashed.
    sha256_hex: OnceLock<String>,
    /// This body's share of `limits.max_inflight_body_bytes`, given back when the last copy
    /// of it (the upstream request's included) is dropped.
    held: Option<Arc<Reservation>>,
}

/// SHA-256 of nothing: the payload hash of a request without a body.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

impl Default for Payload {
    /// The empty body.
    fn default() -> Payload {
        Payload {
            chunks: Vec::new(),
            len: 0,
            sha256_hex: OnceLock::from(EMPTY_SHA256.to_string()),
            held: None,
        }
    }
}

impl Payload {
    /// A body held in one buffer (control-plane reads, tests).
    pub fn from_bytes(bytes: Bytes) -> Payload {
        let mut p = PayloadBuilder::default();
        p.push(bytes);
        p.finish()
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The same body, holding `held` for as long as it lives: a body made from another one
    /// (a rewrite) keeps the original's share of the in-flight limit.
    pub fn holding(mut self, held: Option<Arc<Reservation>>) -> Payload {
        self.held = held;
        self
    }

    /// The share of the in-flight limit this body holds.
    pub fn reservation(&self) -> Option<Arc<Reservation>> {
        self.held.clone()
    }

    /// The whole body in one buffer, for a front that must parse it: no copy when it arrived
    /// as one chunk.
    pub fn to_bytes(&self) -> Bytes {
        match self.chunks.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => {
                let mut whole = BytesMut::with_capacity(usize::try_from(self.len).unwrap_or(0));
                for chunk in many {
                    whole.extend_from_slice(chunk);
                }
                whole.freeze()
            }
        }
    }

    /// The payload hash for SigV4's canonical request.
    pub fn sha256_hex(&self) -> &str {
        self.sha256_hex.get_or_init(|| {
            let mut hasher = Sha256::new();
            for chunk in &self.chunks {
                hasher.update(chunk);
            }
            hex::encode(hasher.finalize())
        })
    }

    /// The body to send: the same chunks, with an exact size.
    pub fn into_body(self) -> Chunks {
        Chunks {
            remaining: self.len,
            chunks: self.chunks.into_iter(),
            _held: self.held,
        }
    }
}

/// Chunks smaller than this are copied together rather than kept one by one, so a body
/// dribbled in tiny pieces costs no more memory (or upstream frames) than a normal one.
const SMALL_CHUNK: usize = 16 * 1024;
/// Size at which the small pieces gathered so far become one chunk.
const GATHERED_CHUNK: usize = 64 * 1024;

/// Collects chunks as they are read, hashing each on arrival.
pub struct PayloadBuilder {
    chunks: Vec<Bytes>,
    /// Small pieces waiting to become one chunk.
    gathered: BytesMut,
    len: u64,
    /// `None` for a body read unhashed.
    hasher: Option<Sha256>,
}

impl Default for PayloadBuilder {
    /// A builder that hashes each chunk as it arrives.
    fn default() -> PayloadBuilder {
        PayloadBuilder {
            chunks: Vec::new(),
            gathered: BytesMut::new(),
            len: 0,
            hasher: Some(Sha256::new()),
        }
    }
}

impl PayloadBuilder {
    /// A builder for a body that will be rewritten before it is sent: nothing is hashed.
    pub fn unhashed() -> PayloadBuilder {
        PayloadBuilder {
            hasher: None,
            ..PayloadBuilder::default()
        }
    }

    pub fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&chunk);
        }
        self.len += chunk.len() as u64;
        if chunk.len() < SMALL_CHUNK {
            self.gathered.extend_from_slice(&chunk);
            if self.gathered.len() >= GATHERED_CHUNK {
                self.chunks.push(self.gathered.split().freeze());
            }
        } else {
            if !self.gathered.is_empty() {
                self.chunks.push(self.gathered.split().freeze());
            }
            self.chunks.push(chunk);
        }
    }

    /// Bytes collected so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(mut self) -> Payload {
        if !self.gathered.is_empty() {
            self.chunks.push(self.gathered.split().freeze());
        }
        let sha256_hex = OnceLock::new();
        if let Some(hasher) = self.hasher {
            let _ = sha256_hex.set(hex::encode(hasher.finalize()));
        }
        Payload {
            chunks: self.chunks,
            len: self.len,
            sha256_hex,
            held: None,
        }
    }
}

/// [`Payload`] as an HTTP body: its chunks in order, then the end.
#[derive(Debug)]
pub struct Chunks {
    chunks: std::vec::IntoIter<Bytes>,
    remaining: u64,
    /// Kept until the body is sent and dropped.
    _held: Option<Arc<Reservation>>,
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.chunks.next() {
            Some(chunk) => {
                self.remaining -= chunk.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn chunks_hash_and_replay_like_one_buffer() {
        let whole = Bytes::from_static(b"{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}");
        let mut b = PayloadBuilder::default();
        for piece in whole.chunks(7) {
            b.push(Bytes::copy_from_slice(piece));
        }
        b.push(Bytes::new());
        let p = b.finish();
        assert_eq!(p.chunks.len(), 1, "tiny pieces are gathered");
        assert_eq!(p.len(), whole.len() as u64);
        assert_eq!(p.sha256_hex(), hex::encode(Sha256::digest(&whole)));
        assert_eq!(
            p.sha256_hex(),
            Payload::from_bytes(whole.clone()).sha256_hex()
        );
        assert_eq!(p.to_bytes(), whole);
        let body = p.clone().into_body();
        assert_eq!(body.size_hint().exact(), Some(whole.len() as u64));
        assert_eq!(body.collect().await.unwrap().to_bytes(), whole);
        // The empty body hashes as SigV4 expects.
        assert_eq!(
            PayloadBuilder::default().finish().sha256_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(Payload::default().sha256_hex(), EMPTY_SHA256);
        // Read unhashed, hashed on first use: the same hash.
        let mut u = PayloadBuilder::unhashed();
        for piece in whole.chunks(7) {
            u.push(Bytes::copy_from_slice(piece));
        }
        assert_eq!(u.finish().sha256_hex(), hex::encode(Sha256::digest(&whole)));
        assert!(
            Payload::from_bytes(Bytes::new())
                .into_body()
                .is_end_stream()
        );
    }
}
