//! Copy one store into another, then compare: how an embedded datastore moves to etcd.
//!
//! The target's revision is first advanced past the source's (by writing and removing scratch
//! keys), then every key is copied with its value, so every object's resourceVersion is higher
//! than any the source handed out. The target's history is then compacted, so a client that still
//! holds a resourceVersion from the source gets 410 Gone and relists. Last, both stores are read in
//! full and compared key by key.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use crate::{KeyValue, RangeRequest, Result, Revision, Store, StoreError};

/// Scratch keys used to advance the target's revision; removed before the copy is verified.
const PAD_PREFIX: &str = "/rkube-migration/pad/";
const PARALLEL: usize = 64;

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub keys: usize,
    pub bytes: usize,
    /// The source's revision the copy was read at.
    pub source_revision: Revision,
    /// The target's revision after the copy (greater than `source_revision`).
    pub target_revision: Revision,
}

async fn all_keys(store: &dyn Store) -> Result<(Revision, Vec<KeyValue>)> {
    let stream = store.range_stream("", 1000).await?;
    let rev = stream.revision;
    let chunks: Vec<Vec<KeyValue>> = stream.chunks.try_collect().await?;
    Ok((rev, chunks.into_iter().flatten().collect()))
}

/// Copy every key of `source` into the empty `target`, advance and compact the target's
/// history past the source's revision, and verify the copy. `progress` hears what happens.
pub async fn migrate(
    source: Arc<dyn Store>,
    target: Arc<dyn Store>,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Report> {
    let existing = target
        .range(RangeRequest {
            prefix: String::new(),
            limit: 1,
            ..Default::default()
        })
        .await?;
    if let Some(kv) = existing.kvs.first() {
        return Err(StoreError::Backend(format!(
            "the target already holds keys (first: {}); migrate into an empty etcd",
            kv.key
        )));
    }
    let (source_revision, kvs) = all_keys(source.as_ref()).await?;
    let bytes = kvs.iter().map(|kv| kv.value.len()).sum();
    // Advance the target's revision past the source's.
    let now = target.current_revision().await?;
    if now <= source_revision {
        progress(&format!(
            "advancing the target's revision from {now} past {source_revision}"
        ));
        let reached = Arc::new(AtomicI64::new(now.0));
        let pads = (0..PARALLEL).map(|i| {
            let (target, reached) = (target.clone(), reached.clone());
            async move {
                let key = format!("{PAD_PREFIX}{i}");
                let mut rev = target.create(&key, Default::default()).await?;
                while reached.fetch_max(rev.0, Ordering::SeqCst).max(rev.0) <= source_revision.0 {
                    rev = target.update(&key, Default::default(), rev).await?;
                }
                target.delete(&key, Some(rev)).await.map(|_| ())
            }
        });
        futures::stream::iter(pads)
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<()>>()
            .await?;
    }
    progress(&format!(
        "copying {} keys ({} bytes) read at revision {}",
        kvs.len(),
        bytes,
        source_revision
    ));
    futures::stream::iter(kvs.iter().map(|kv| {
        let target = target.clone();
        async move { target.create(&kv.key, kv.value.clone()).await.map(|_| ()) }
    }))
    .buffer_unordered(PARALLEL)
    .try_collect::<Vec<()>>()
    .await?;

    let target_revision = target.current_revision().await?;
    // Old resourceVersions must not be resumed against the new history: compact it all.
    match target.compact(target_revision).await {
        Ok(()) | Err(StoreError::Compacted { .. }) => {}
        Err(e) => return Err(e),
    }

    // Verify: the same keys with the same values, nothing else.
    let (_, copied) = all_keys(target.as_ref()).await?;
    if copied.len() != kvs.len() {
        return Err(StoreError::Backend(format!(
            "verification failed: the source has {} keys, the target {}",
            kvs.len(),
            copied.len()
        )));
    }
    for (a, b) in kvs.iter().zip(&copied) {
        if a.key != b.key || a.value != b.value {
            return Err(StoreError::Backend(format!(
                "verification failed at {} (target has {})",
                a.key, b.key
            )));
        }
    }
    progress(&format!(
        "verified: {} keys identical; target revision {target_revision} > source revision {source_revision}",
        copied.len()
    ));
    Ok(Report {
        keys: copied.len(),
        bytes,
        source_revision,
        target_revision,
    })
}
