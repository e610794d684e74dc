//! store: a revisioned key-value store in the shape of etcd v3, and its embedded SQLite backend.
//!
//! Every write gets the next cluster-wide [`Revision`]; reads can be served at the current or
//! an earlier (not yet compacted) revision; watches replay history after a revision and then
//! follow live changes, with previous values. Writes are compare-and-swap on a key's
//! modification revision.
//!
//! What it is not: it knows nothing about Kubernetes, HTTP or JSON. Keys are strings, values
//! are bytes. The API server turns [`StoreError`]s into HTTP statuses.

mod etcd;
pub mod migrate;
mod recent;
mod sqlite;
pub mod testing;

use std::fmt;
use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;

pub use etcd::{EtcdConfig, EtcdStore};
pub use sqlite::SqliteStore;

/// The largest value the store accepts, as etcd's default request limit.
pub const MAX_VALUE_BYTES: usize = 1536 * 1024;

/// A point in the store's history: every successful write creates exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Revision(pub i64);

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One key at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    /// Revision at which this incarnation of the key was created.
    pub create_revision: Revision,
    /// Revision of the write that produced this value.
    pub mod_revision: Revision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change, as a watcher sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// For a put, the new value. For a delete, the key with its last value and
    /// `mod_revision` set to the revision of the delete.
    pub kv: KeyValue,
    /// The value before this change (absent for a create).
    pub prev: Option<KeyValue>,
}

impl Event {
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// A range read: keys starting with `prefix`, strictly after `start_after` when given,
/// in key order, at most `limit` (0 = no limit), at `revision` (None = current).
#[derive(Debug, Clone, Default)]
pub struct RangeRequest {
    pub prefix: String,
    pub start_after: Option<String>,
    pub limit: usize,
    pub revision: Option<Revision>,
}

#[derive(Debug, Clone)]
pub struct RangeResponse {
    pub kvs: Vec<KeyValue>,
    /// More keys match after the last one returned.
    pub more: bool,
    /// The revision this read was served at.
    pub revision: Revision,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {key} already exists")]
    AlreadyExists { key: String },
    #[error("key {key} not found")]
    NotFound { key: String },
    #[error("key {key}: modification revision is {actual}, expected {expected}")]
    Conflict {
        key: String,
        expected: Revision,
        actual: Revision,
    },
    #[error("revision {requested} has been compacted (oldest available is {compacted})")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    #[error("revision {requested} is in the future (current is {current})")]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    #[error("value of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    /// The backend cannot answer now (no quorum, unreachable, timed out); a write's outcome
    /// may be unknown, but it was never acknowledged.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("store is closed")]
    Closed,
    #[error("storage backend: {0}")]
    Backend(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<Event>> + Send>>;

/// A range read at one revision, delivered in chunks (for lists too large to hold at once).
pub struct RangeStream {
    /// The revision every chunk is read at.
    pub revision: Revision,
    pub chunks: Pin<Box<dyn Stream<Item = Result<Vec<KeyValue>>> + Send>>,
}

/// The storage seam. Implementations: [`SqliteStore`] (embedded) and [`EtcdStore`].
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// The newest value of `key`, if it exists.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;
    /// Keys under a prefix, at the current or a past revision.
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse>;
    /// Every key under `prefix` at the current revision, in key order, in chunks of about
    /// `chunk` keys. The default reads it all at once; backends may stream.
    async fn range_stream(&self, prefix: &str, chunk: usize) -> Result<RangeStream> {
        let _ = chunk;
        let resp = self
            .range(RangeRequest {
                prefix: prefix.to_string(),
                ..Default::default()
            })
            .await?;
        Ok(RangeStream {
            revision: resp.revision,
            chunks: Box::pin(futures::stream::once(async move { Ok(resp.kvs) })),
        })
    }
    /// Create `key`; fails with `AlreadyExists` if it exists.
    async fn create(&self, key: &str, value: Bytes) -> Result<Revision>;
    /// Replace `key` if its modification revision is `expected`.
    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<Revision>;
    /// Delete `key`, if `expected` is given only at that modification revision.
    /// Returns the delete's revision and the value deleted.
    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)>;
    /// Every change to keys under `prefix` with a revision greater than `after`, in revision order,
    /// then live changes. Fails with `Compacted` if history after `after` is gone.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream>;
    /// Forget history at and before `revision` (the newest value of each key is kept).
    async fn compact(&self, revision: Revision) -> Result<()>;
    /// The newest revision.
    async fn current_revision(&self) -> Result<Revision>;
    /// The newest compacted revision (0 if never compacted).
    async fn compacted_revision(&self) -> Result<Revision>;
}

/// Refuse a value over [`MAX_VALUE_BYTES`] before it reaches a backend.
pub(crate) fn check_size(value: &Bytes) -> Result<()> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(StoreError::TooLarge {
            size: value.len(),
            limit: MAX_VALUE_BYTES,
        });
    }
    Ok(())
}

/// The smallest string greater than every string that starts with `prefix`.
pub fn prefix_end(prefix: &str) -> String {
    // Keys are ASCII paths; appending the largest scalar value bounds them.
    let mut end = prefix.to_string();
    end.push(char::MAX);
    end
}
