//! The embedded backend: SQLite in WAL mode with `synchronous=FULL`.
//!
//! Layout:
//! - `log`: one row per write; its `id` (AUTOINCREMENT, never reused) *is* the revision.
//!   A row carries the key, the value (empty for a delete), the key's create revision, and
//!   `prev_revision`, the id of the row it superseded (for previous values in watches).
//! - `kv`: every live key with its create and mod revisions, so that reads and lists cost what
//!   they return, not what the history holds. The value itself is the `log` row whose id is
//!   the key's mod revision (compaction keeps each live key's newest row): one copy per write.
//! - `meta`: the compacted revision.
//!
//! Write path (ordering matters): one writer thread owns the only write connection. It takes every
//! queued write, runs them all in one `BEGIN IMMEDIATE` transaction (each checks its compare
//! against `kv` inside that transaction), commits once (one fsync for the whole batch), and only
//! then answers the callers and publishes the events. So an acknowledged write is durable, and a
//! watcher never sees a write that could still be rolled back.
//!
//! Read path: a point read of a recently written key is answered from the writer's memory of
//! the latest committed values (`recent.rs`: filled only by the writer, right after each commit
//! and before the write is published or answered); anything else goes to a small pool of read
//! connections; WAL readers never block the writer. The writer checks its compares against the
//! same memory (and the transaction's own earlier writes) before it asks `kv`.
//! Watch path: subscribe to the live broadcast first, then replay `log` after the requested
//! revision, then pass live events newer than the last replayed one. A watcher that falls behind
//! the broadcast replays from the log again instead of losing events.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{broadcast, oneshot};

use crate::recent::{Entry, Recent};
use crate::{
    check_size, prefix_end, Event, EventKind, KeyValue, RangeRequest, RangeResponse, Result,
    Revision, Store, StoreError, WatchStream,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    create_revision INTEGER NOT NULL,
    prev_revision INTEGER NOT NULL,
    value BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS log_key_id ON log (key, id);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
";

/// Events published to live watchers; a receiver that lags replays from the log.
const BROADCAST_CAPACITY: usize = 8192;
/// How many writes the writer takes into one transaction at most.
const MAX_BATCH: usize = 1024;
/// How long a batch that already holds more than one write waits for more.
const GATHER: std::time::Duration = std::time::Duration::from_micros(300);
const READ_POOL: usize = 4;
/// Revisions compacted per transaction.
const COMPACT_STEP: i64 = 10_000;

enum WriteOp {
    Create {
        key: String,
        value: Bytes,
    },
    Update {
        key: String,
        value: Bytes,
        expected: Revision,
    },
    Delete {
        key: String,
        expected: Option<Revision>,
    },
    Compact {
        revision: Revision,
    },
}

enum WriteReply {
    Written(Event),
    Compacted,
}

struct WriteRequest {
    op: WriteOp,
    reply: oneshot::Sender<Result<WriteReply>>,
}

struct Shared {
    path: PathBuf,
    readers: Mutex<Vec<Connection>>,
    current: AtomicI64,
    compacted: AtomicI64,
    events: broadcast::Sender<Arc<Event>>,
    /// Latest committed values of recently written keys; only the writer changes it.
    recent: Mutex<Recent>,
    /// The database's lock (`lock_database`), released when the last user is gone.
    _lock: std::fs::File,
}

impl Shared {
    fn recent(&self, key: &str) -> Option<Entry> {
        self.recent.lock().ok()?.get(key).cloned()
    }
}

/// The embedded store. Cheap to clone; dropping the last clone stops the writer.
#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
    writer: mpsc::Sender<WriteRequest>,
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// The writer's page cache, in KiB (SQLite's default is 2 MiB): every write walks the kv table,
/// the log and its index. It grows only as pages are read. Readers keep the default.
const WRITER_CACHE_KIB: i64 = 16 * 1024;
const READER_CACHE_KIB: i64 = 2000;
/// The values of recently written keys kept in memory (`recent.rs`), in bytes.
const RECENT_BYTES: usize = 32 << 20;

fn open_connection(path: &Path, cache_kib: i64) -> Result<Connection> {
    let conn = Connection::open(path).map_err(backend)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))
        .map_err(backend)?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF; \
         PRAGMA cache_size=-{cache_kib};"
    ))
    .map_err(backend)?;
    Ok(conn)
}

fn read_revisions(conn: &Connection) -> Result<(i64, i64)> {
    let current: i64 = conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'log'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(backend)?
        .unwrap_or(0);
    let compacted: i64 = conn
        .query_row("SELECT value FROM meta WHERE name = 'compacted'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(backend)?
        .unwrap_or(0);
    Ok((current, compacted))
}

/// How long opening waits for another holder of the database (a store being closed in this
/// process, whose writer is finishing) before it gives up.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// An exclusive lock on `<db>.lock`, held while the store is open: one writer per database. The
/// writer trusts its memory of recent values, which another process writing the same file would
/// make stale; SQLite's own locking would not catch that.
fn lock_database(path: &Path, wait: std::time::Duration) -> Result<std::fs::File> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    let lock_path = path.with_file_name(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Backend(format!("{}: {e}", lock_path.display())))?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Backend(format!(
                    "{} is in use by another process (is another rkube server running on this \
                     data dir?)",
                    path.display()
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError::Backend(format!("{}: {e}", lock_path.display())))
            }
        }
    }
}

impl SqliteStore {
    /// Open (creating if needed) the database at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_waiting(path.as_ref(), LOCK_WAIT)
    }

    fn open_waiting(path: &Path, wait: std::time::Duration) -> Result<Self> {
        let lock = lock_database(path, wait)?;
        let path = path.to_path_buf();
        let write_conn = open_connection(&path, WRITER_CACHE_KIB)?;
        // New databases give pages freed by compaction back on `incremental_vacuum` (this
        // setting only takes effect before the first table exists).
        write_conn
            .execute_batch("PRAGMA auto_vacuum=INCREMENTAL;")
            .map_err(backend)?;
        write_conn.execute_batch(SCHEMA).map_err(backend)?;
        drop_kv_values(&write_conn)?;
        let (current, compacted) = read_revisions(&write_conn)?;
        let mut readers = Vec::with_capacity(READ_POOL);
        for _ in 0..READ_POOL {
            readers.push(open_connection(&path, READER_CACHE_KIB)?);
        }
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let shared = Arc::new(Shared {
            path,
            readers: Mutex::new(readers),
            current: AtomicI64::new(current),
            compacted: AtomicI64::new(compacted),
            events,
            recent: Mutex::new(Recent::new(RECENT_BYTES)),
            _lock: lock,
        });
        let (tx, rx) = mpsc::channel::<WriteRequest>();
        let writer_shared = shared.clone();
        thread::Builder::new()
            .name("rkube-store-writer".into())
            .spawn(move || writer_loop(write_conn, rx, writer_shared))
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        Ok(SqliteStore { shared, writer: tx })
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    async fn write(&self, op: WriteOp) -> Result<WriteReply> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(WriteRequest { op, reply })
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let conn = shared.readers.lock().ok().and_then(|mut p| p.pop());
            let conn = match conn {
                Some(c) => c,
                None => open_connection(&shared.path, READER_CACHE_KIB)?,
            };
            let out = f(&conn);
            if let Ok(mut pool) = shared.readers.lock() {
                if pool.len() < READ_POOL {
                    pool.push(conn);
                }
            }
            out
        })
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))?
    }
}

/// Databases written before values lived in `log` only kept a copy of each current value in
/// `kv.value`: drop the column (every current value is also its key's newest `log` row, which
/// compaction never removes). Once, on the first open.
fn drop_kv_values(conn: &Connection) -> Result<()> {
    let has_values: bool = conn
        .query_row(
            "SELECT COUNT(*) FROM pragma_table_info('kv') WHERE name = 'value'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(backend)?
        > 0;
    if has_values {
        conn.execute_batch("ALTER TABLE kv DROP COLUMN value;")
            .map_err(backend)?;
    }
    Ok(())
}

fn current_kv(conn: &Connection, key: &str) -> Result<Option<KeyValue>> {
    conn.prepare_cached(
        "SELECT kv.create_revision, kv.mod_revision, log.value FROM kv CROSS JOIN log \
         ON log.id = kv.mod_revision WHERE kv.key = ?1",
    )
    .map_err(backend)?
    .query_row(params![key], |r| {
        Ok(KeyValue {
            key: key.to_string(),
            create_revision: Revision(r.get(0)?),
            mod_revision: Revision(r.get(1)?),
            value: Bytes::from(r.get::<_, Vec<u8>>(2)?),
        })
    })
    .optional()
    .map_err(backend)
}

/// A row of `(key, create_revision, mod_revision, value)`.
fn row_kv(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyValue> {
    Ok(KeyValue {
        key: r.get(0)?,
        create_revision: Revision(r.get(1)?),
        mod_revision: Revision(r.get(2)?),
        value: Bytes::from(r.get::<_, Vec<u8>>(3)?),
    })
}

/// Append a row to the log; its id is the next revision. `create_revision` None: the row
/// creates the key, so its create revision is its own id.
fn append_log(
    conn: &Connection,
    key: &str,
    deleted: bool,
    create_revision: Option<i64>,
    prev_revision: i64,
    value: &[u8],
) -> Result<i64> {
    // A create names its id: the one AUTOINCREMENT would pick, one past the largest ever used
    // (the writer is the only writer, inside its transaction), so that its create revision (its
    // own id) goes in with the row instead of rewriting the row, value and all, afterwards.
    // Other writes leave the id NULL: AUTOINCREMENT picks it.
    let (id, create_revision) = match create_revision {
        Some(c) => (None, c),
        None => {
            let next = conn
                .prepare_cached("SELECT seq FROM sqlite_sequence WHERE name = 'log'")
                .map_err(backend)?
                .query_row([], |r| r.get::<_, i64>(0))
                .optional()
                .map_err(backend)?
                .unwrap_or(0)
                + 1;
            (Some(next), next)
        }
    };
    conn.prepare_cached(
        "INSERT INTO log (id, key, deleted, create_revision, prev_revision, value) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .map_err(backend)?
    .execute(params![
        id,
        key,
        deleted as i64,
        create_revision,
        prev_revision,
        value
    ])
    .map_err(backend)?;
    Ok(conn.last_insert_rowid())
}

/// Keys written by the ops of the open transaction that succeeded so far, with their new state.
type Overlay = HashMap<String, Entry>;

/// The current value of `key` inside the writer's open transaction: this transaction's own
/// writes first, then the recent values (committed state), then the database.
fn current(
    conn: &Connection,
    shared: &Shared,
    overlay: &Overlay,
    key: &str,
) -> Result<Option<KeyValue>> {
    if let Some(e) = overlay.get(key) {
        return Ok(e.clone().into_option());
    }
    if let Some(e) = shared.recent(key) {
        return Ok(e.into_option());
    }
    current_kv(conn, key)
}

/// The current value of `key` for a write that expects it at `expected` (any revision if None).
fn current_for_write(
    conn: &Connection,
    shared: &Shared,
    overlay: &Overlay,
    key: &str,
    expected: Option<Revision>,
) -> Result<KeyValue> {
    let cur = current(conn, shared, overlay, key)?.ok_or_else(|| StoreError::NotFound {
        key: key.to_string(),
    })?;
    match expected {
        Some(expected) if cur.mod_revision != expected => Err(StoreError::Conflict {
            key: key.to_string(),
            expected,
            actual: cur.mod_revision,
        }),
        _ => Ok(cur),
    }
}

/// Apply one write inside the open transaction. Errors that are answers (conflict, exists)
/// leave the database untouched.
fn apply(
    conn: &Connection,
    op: &WriteOp,
    shared: &Shared,
    overlay: &Overlay,
) -> Result<WriteReply> {
    match op {
        WriteOp::Create { key, value } => {
            check_size(value)?;
            if current(conn, shared, overlay, key)?.is_some() {
                return Err(StoreError::AlreadyExists { key: key.clone() });
            }
            let prev = conn
                .prepare_cached("SELECT MAX(id) FROM log WHERE key = ?1")
                .map_err(backend)?
                .query_row(params![key], |r| r.get::<_, Option<i64>>(0))
                .map_err(backend)?
                .unwrap_or(0);
            let rev = append_log(conn, key, false, None, prev, value)?;
            conn.prepare_cached(
                "INSERT INTO kv (key, create_revision, mod_revision) VALUES (?1, ?2, ?2)",
            )
            .map_err(backend)?
            .execute(params![key, rev])
            .map_err(backend)?;
            Ok(WriteReply::Written(Event {
                kind: EventKind::Put,
                kv: KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    create_revision: Revision(rev),
                    mod_revision: Revision(rev),
                },
                prev: None,
            }))
        }
        WriteOp::Update {
            key,
            value,
            expected,
        } => {
            check_size(value)?;
            let cur = current_for_write(conn, shared, overlay, key, Some(*expected))?;
            let rev = append_log(
                conn,
                key,
                false,
                Some(cur.create_revision.0),
                cur.mod_revision.0,
                value,
            )?;
            conn.prepare_cached("UPDATE kv SET mod_revision = ?2 WHERE key = ?1")
                .map_err(backend)?
                .execute(params![key, rev])
                .map_err(backend)?;
            Ok(WriteReply::Written(Event {
                kind: EventKind::Put,
                kv: KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    create_revision: cur.create_revision,
                    mod_revision: Revision(rev),
                },
                prev: Some(cur),
            }))
        }
        WriteOp::Delete { key, expected } => {
            let cur = current_for_write(conn, shared, overlay, key, *expected)?;
            let rev = append_log(
                conn,
                key,
                true,
                Some(cur.create_revision.0),
                cur.mod_revision.0,
                &[],
            )?;
            conn.prepare_cached("DELETE FROM kv WHERE key = ?1")
                .map_err(backend)?
                .execute(params![key])
                .map_err(backend)?;
            Ok(WriteReply::Written(Event {
                kind: EventKind::Delete,
                kv: KeyValue {
                    key: key.clone(),
                    value: cur.value.clone(),
                    create_revision: cur.create_revision,
                    mod_revision: Revision(rev),
                },
                prev: Some(cur),
            }))
        }
        WriteOp::Compact { revision } => {
            let current = shared.current.load(Ordering::SeqCst);
            let compacted = shared.compacted.load(Ordering::SeqCst);
            if revision.0 > current {
                return Err(StoreError::FutureRevision {
                    requested: *revision,
                    current: Revision(current),
                });
            }
            if revision.0 <= compacted {
                return Err(StoreError::Compacted {
                    requested: *revision,
                    compacted: Revision(compacted),
                });
            }
            // Keep, for every key, its newest row at or before the compaction point unless that
            // row is a delete; drop every older row. Only rows written since the last compaction
            // can supersede anything (each names the row it superseded), so the cost is that of
            // the new history, not of the whole log.
            conn.execute(
                "DELETE FROM log WHERE id IN (
                    SELECT prev_revision FROM log WHERE id > ?1 AND id <= ?2 AND prev_revision > 0)",
                params![compacted, revision.0],
            )
            .map_err(backend)?;
            conn.execute(
                "DELETE FROM log WHERE id > ?1 AND id <= ?2 AND deleted = 1",
                params![compacted, revision.0],
            )
            .map_err(backend)?;
            conn.execute(
                "INSERT INTO meta (name, value) VALUES ('compacted', ?1)
                 ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                params![revision.0],
            )
            .map_err(backend)?;
            Ok(WriteReply::Compacted)
        }
    }
}

/// One statement, prepared once per connection (the writer runs four of these per write: parsing
/// them each time showed in profiles).
fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

fn writer_loop(conn: Connection, rx: mpsc::Receiver<WriteRequest>, shared: Arc<Shared>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let drain = |batch: &mut Vec<WriteRequest>| {
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
        };
        drain(&mut batch);
        // Writes are arriving together: let the rest of them in before committing, so that
        // they share one commit (one fsync and one rewrite of the pages they share). A lone
        // write (one kubectl's) does not wait.
        if batch.len() > 1 {
            std::thread::sleep(GATHER);
            drain(&mut batch);
        }
        if let Err(e) = exec(&conn, "BEGIN IMMEDIATE") {
            for r in batch {
                let _ = r.reply.send(Err(StoreError::Backend(e.to_string())));
            }
            continue;
        }
        let mut overlay = Overlay::new();
        let results: Vec<Result<WriteReply>> = batch
            .iter()
            .map(|r| {
                exec(&conn, "SAVEPOINT op").map_err(backend)?;
                let out = apply(&conn, &r.op, &shared, &overlay);
                if out.is_err() {
                    exec(&conn, "ROLLBACK TO op").map_err(backend)?;
                }
                exec(&conn, "RELEASE op").map_err(backend)?;
                if let Ok(WriteReply::Written(ev)) = &out {
                    let entry = match ev.kind {
                        EventKind::Put => Entry::Present(ev.kv.clone()),
                        EventKind::Delete => Entry::Absent,
                    };
                    overlay.insert(ev.kv.key.clone(), entry);
                }
                out
            })
            .collect();
        if let Err(e) = exec(&conn, "COMMIT") {
            tracing::error!(error = %e, "store commit failed");
            let _ = conn.execute_batch("ROLLBACK");
            for r in batch {
                let _ = r.reply.send(Err(StoreError::Backend(e.to_string())));
            }
            continue;
        }
        // Committed: the recent values learn this transaction's writes first (before anyone
        // hears of them), then publish in revision order, then answer.
        if let Ok(mut recent) = shared.recent.lock() {
            for (key, entry) in overlay {
                recent.put(key, entry);
            }
        }
        let mut compacted = false;
        for (req, res) in batch.into_iter().zip(results) {
            match &res {
                Ok(WriteReply::Written(ev)) => {
                    shared.current.store(ev.revision().0, Ordering::SeqCst);
                    let _ = shared.events.send(Arc::new(ev.clone()));
                }
                Ok(WriteReply::Compacted) => {
                    compacted = true;
                    if let WriteOp::Compact { revision } = &req.op {
                        shared.compacted.store(revision.0, Ordering::SeqCst);
                    }
                }
                Err(_) => {}
            }
            let _ = req.reply.send(res);
        }
        if compacted {
            // Hand pages freed by compaction back to the file system and keep the WAL short:
            // writes, so here on the one write connection, not on a reader.
            if let Err(e) =
                conn.execute_batch("PRAGMA incremental_vacuum; PRAGMA wal_checkpoint(PASSIVE);")
            {
                tracing::warn!(error = %e, "store: vacuum after compaction failed");
            }
        }
    }
    // All senders dropped: checkpoint so the WAL does not outlive us.
    let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
}

fn row_to_event(
    key: String,
    deleted: bool,
    id: i64,
    create_revision: i64,
    value: Vec<u8>,
    prev: Option<(i64, Vec<u8>, i64)>,
) -> Event {
    let prev = prev.map(|(prev_id, prev_value, prev_create)| KeyValue {
        key: key.clone(),
        value: Bytes::from(prev_value),
        create_revision: Revision(prev_create),
        mod_revision: Revision(prev_id),
    });
    if deleted {
        let last = prev.clone().map(|p| p.value).unwrap_or_default();
        Event {
            kind: EventKind::Delete,
            kv: KeyValue {
                key,
                value: last,
                create_revision: Revision(create_revision),
                mod_revision: Revision(id),
            },
            prev,
        }
    } else {
        Event {
            kind: EventKind::Put,
            kv: KeyValue {
                key,
                value: Bytes::from(value),
                create_revision: Revision(create_revision),
                mod_revision: Revision(id),
            },
            prev: prev.filter(|p| p.create_revision.0 == create_revision),
        }
    }
}

/// Up to `limit` events under `prefix` with revision in (after, ..], oldest first.
fn replay(conn: &Connection, prefix: &str, after: i64, limit: i64) -> Result<Vec<Event>> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT l.key, l.deleted, l.id, l.create_revision, l.value, p.id, p.value, p.create_revision, p.deleted
             FROM log l LEFT JOIN log p ON p.id = l.prev_revision
             WHERE l.id > ?1 AND l.key >= ?2 AND l.key < ?3 ORDER BY l.id LIMIT ?4",
        )
        .map_err(backend)?;
    let rows = stmt
        .query_map(params![after, prefix, prefix_end(prefix), limit], |r| {
            let prev_id: Option<i64> = r.get(5)?;
            let prev_deleted: Option<i64> = r.get(8)?;
            let prev = match (prev_id, prev_deleted) {
                (Some(id), Some(0)) => Some((id, r.get::<_, Vec<u8>>(6)?, r.get::<_, i64>(7)?)),
                _ => None,
            };
            Ok(row_to_event(
                r.get(0)?,
                r.get::<_, i64>(1)? != 0,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                prev,
            ))
        })
        .map_err(backend)?;
    rows.collect::<std::result::Result<Vec<_>, _>>()
        .map_err(backend)
}

fn check_not_compacted(conn: &Connection, rev: i64) -> Result<()> {
    let (_, compacted) = read_revisions(conn)?;
    if rev < compacted {
        return Err(StoreError::Compacted {
            requested: Revision(rev),
            compacted: Revision(compacted),
        });
    }
    Ok(())
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        // A recently written key: its latest committed value, without a trip to SQLite.
        if let Some(e) = self.shared.recent(key) {
            return Ok(e.into_option());
        }
        let key = key.to_string();
        self.read(move |conn| current_kv(conn, &key)).await
    }

    async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        self.read(move |conn| {
            exec(conn, "BEGIN").map_err(backend)?;
            let out = range_in_txn(conn, &req);
            let _ = exec(conn, "COMMIT");
            out
        })
        .await
    }

    async fn range_stream(&self, prefix: &str, chunk: usize) -> Result<crate::RangeStream> {
        // One read transaction (one snapshot) for the whole list; rows go out in chunks through
        // a small bounded channel, so memory holds a few chunks, not the list.
        let (rev_tx, rev_rx) = oneshot::channel::<Result<Revision>>();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<KeyValue>>>(4);
        let shared = self.shared.clone();
        let prefix = prefix.to_string();
        let chunk = chunk.max(1);
        tokio::task::spawn_blocking(move || {
            let conn = shared.readers.lock().ok().and_then(|mut p| p.pop());
            let conn = match conn {
                Some(c) => c,
                None => match open_connection(&shared.path, READER_CACHE_KIB) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = rev_tx.send(Err(e));
                        return;
                    }
                },
            };
            let run = |conn: &Connection| -> Result<()> {
                exec(conn, "BEGIN").map_err(backend)?;
                let (current, _) = read_revisions(conn)?;
                if rev_tx.send(Ok(Revision(current))).is_err() {
                    return Ok(());
                }
                let mut stmt = conn
                    .prepare_cached(
                        "SELECT kv.key, kv.create_revision, kv.mod_revision, log.value FROM kv CROSS JOIN log \
                         ON log.id = kv.mod_revision WHERE kv.key >= ?1 AND kv.key < ?2 ORDER BY kv.key",
                    )
                    .map_err(backend)?;
                let rows = stmt
                    .query_map(params![prefix, prefix_end(&prefix)], row_kv)
                    .map_err(backend)?;
                let mut buf = Vec::with_capacity(chunk);
                for row in rows {
                    buf.push(row.map_err(backend)?);
                    if buf.len() == chunk && tx.blocking_send(Ok(std::mem::take(&mut buf))).is_err()
                    {
                        return Ok(());
                    }
                }
                if !buf.is_empty() {
                    let _ = tx.blocking_send(Ok(buf));
                }
                Ok(())
            };
            let out = run(&conn);
            let _ = exec(&conn, "COMMIT");
            if let Err(e) = out {
                let _ = tx.blocking_send(Err(e));
            }
            if let Ok(mut pool) = shared.readers.lock() {
                if pool.len() < READ_POOL {
                    pool.push(conn);
                }
            }
        });
        let revision = rev_rx.await.map_err(|_| StoreError::Closed)??;
        Ok(crate::RangeStream {
            revision,
            chunks: Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)),
        })
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<Revision> {
        match self
            .write(WriteOp::Create {
                key: key.to_string(),
                value,
            })
            .await?
        {
            WriteReply::Written(ev) => Ok(ev.revision()),
            WriteReply::Compacted => Err(StoreError::Backend("unexpected reply".into())),
        }
    }

    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<Revision> {
        match self
            .write(WriteOp::Update {
                key: key.to_string(),
                value,
                expected,
            })
            .await?
        {
            WriteReply::Written(ev) => Ok(ev.revision()),
            WriteReply::Compacted => Err(StoreError::Backend("unexpected reply".into())),
        }
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)> {
        match self
            .write(WriteOp::Delete {
                key: key.to_string(),
                expected,
            })
            .await?
        {
            WriteReply::Written(ev) => Ok((ev.revision(), ev.prev.unwrap_or(ev.kv))),
            WriteReply::Compacted => Err(StoreError::Backend("unexpected reply".into())),
        }
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        // Fail fast if the start is already compacted.
        self.read(move |conn| check_not_compacted(conn, after.0))
            .await?;
        Ok(Box::pin(watch_stream(
            self.clone(),
            prefix.to_string(),
            after,
        )))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        // In steps, each its own small transaction, so writers queue behind none of them for long.
        let mut done = self.shared.compacted.load(Ordering::SeqCst);
        while revision.0 - done > COMPACT_STEP {
            done += COMPACT_STEP;
            self.write(WriteOp::Compact {
                revision: Revision(done),
            })
            .await?;
        }
        self.write(WriteOp::Compact { revision }).await.map(|_| ())
    }

    async fn current_revision(&self) -> Result<Revision> {
        Ok(Revision(self.shared.current.load(Ordering::SeqCst)))
    }

    async fn compacted_revision(&self) -> Result<Revision> {
        Ok(Revision(self.shared.compacted.load(Ordering::SeqCst)))
    }
}

fn range_in_txn(conn: &Connection, req: &RangeRequest) -> Result<RangeResponse> {
    let (current, compacted) = read_revisions(conn)?;
    let start = req.start_after.clone().unwrap_or_default();
    let end = prefix_end(&req.prefix);
    let lower = if start.as_str() > req.prefix.as_str() {
        start.clone()
    } else {
        req.prefix.clone()
    };
    let strict = start.as_str() >= req.prefix.as_str() && !start.is_empty();
    let fetch = if req.limit == 0 {
        -1
    } else {
        req.limit as i64 + 1
    };
    let at = req.revision.map(|r| r.0).unwrap_or(0);
    if at > current {
        return Err(StoreError::FutureRevision {
            requested: Revision(at),
            current: Revision(current),
        });
    }
    let mut kvs = Vec::new();
    if at == 0 || at == current {
        let sql = if strict {
            "SELECT kv.key, kv.create_revision, kv.mod_revision, log.value FROM kv CROSS JOIN log \
             ON log.id = kv.mod_revision WHERE kv.key > ?1 AND kv.key < ?2 ORDER BY kv.key LIMIT ?3"
        } else {
            "SELECT kv.key, kv.create_revision, kv.mod_revision, log.value FROM kv CROSS JOIN log \
             ON log.id = kv.mod_revision WHERE kv.key >= ?1 AND kv.key < ?2 ORDER BY kv.key LIMIT ?3"
        };
        let mut stmt = conn.prepare_cached(sql).map_err(backend)?;
        let rows = stmt
            .query_map(params![lower, end, fetch], row_kv)
            .map_err(backend)?;
        for row in rows {
            kvs.push(row.map_err(backend)?);
        }
    } else {
        if at < compacted {
            return Err(StoreError::Compacted {
                requested: Revision(at),
                compacted: Revision(compacted),
            });
        }
        let sql = if strict {
            "SELECT key, create_revision, MAX(id), value, deleted FROM log WHERE key > ?1 AND key < ?2 AND id <= ?4
             GROUP BY key HAVING deleted = 0 ORDER BY key LIMIT ?3"
        } else {
            "SELECT key, create_revision, MAX(id), value, deleted FROM log WHERE key >= ?1 AND key < ?2 AND id <= ?4
             GROUP BY key HAVING deleted = 0 ORDER BY key LIMIT ?3"
        };
        let mut stmt = conn.prepare_cached(sql).map_err(backend)?;
        let rows = stmt
            .query_map(params![lower, end, fetch, at], row_kv)
            .map_err(backend)?;
        for row in rows {
            kvs.push(row.map_err(backend)?);
        }
    }
    let more = req.limit > 0 && kvs.len() > req.limit;
    if more {
        kvs.truncate(req.limit);
    }
    Ok(RangeResponse {
        kvs,
        more,
        revision: Revision(if at == 0 { current } else { at }),
    })
}

/// Events replayed from the log per read: a watcher holds at most one page in memory.
const REPLAY_PAGE: i64 = 1000;

/// Replay, then follow live events; on lag, replay again from the last delivered revision.
/// Replay reads the log a page at a time, only when the previous page has been consumed, so a
/// watcher far behind costs one page of memory, not its whole backlog.
fn watch_stream(
    store: SqliteStore,
    prefix: String,
    after: Revision,
) -> impl futures::Stream<Item = Result<Event>> + Send {
    struct St {
        store: SqliteStore,
        prefix: String,
        /// The newest revision delivered (or skipped as not ours).
        last: i64,
        rx: Option<broadcast::Receiver<Arc<Event>>>,
        pending: std::collections::VecDeque<Event>,
        /// The log may hold more after `last` than the pages read so far.
        replaying: bool,
        done: bool,
    }
    let st = St {
        store,
        prefix,
        last: after.0,
        rx: None,
        pending: Default::default(),
        replaying: false,
        done: false,
    };
    futures::stream::unfold(st, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            if let Some(ev) = st.pending.pop_front() {
                st.last = ev.revision().0;
                return Some((Ok(ev), st));
            }
            if st.rx.is_none() {
                // Subscribe before replaying so nothing falls between the two.
                st.rx = Some(st.store.shared.events.subscribe());
                st.replaying = true;
            }
            if st.replaying {
                let prefix = st.prefix.clone();
                let last = st.last;
                let res = st
                    .store
                    .read(move |conn| {
                        check_not_compacted(conn, last)?;
                        replay(conn, &prefix, last, REPLAY_PAGE)
                    })
                    .await;
                match res {
                    Ok(evs) => {
                        st.replaying = evs.len() as i64 == REPLAY_PAGE;
                        st.pending.extend(evs);
                    }
                    Err(e) => {
                        st.done = true;
                        return Some((Err(e), st));
                    }
                }
                continue;
            }
            let rx = st.rx.as_mut()?;
            match rx.recv().await {
                Ok(ev) => {
                    if ev.revision().0 <= st.last || !ev.kv.key.starts_with(&st.prefix) {
                        continue;
                    }
                    st.last = ev.revision().0;
                    return Some((Ok((*ev).clone()), st));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Fell behind the live broadcast: drop it and catch up from the log.
                    st.rx = None;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    st.done = true;
                    return Some((Err(StoreError::Closed), st));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests;
