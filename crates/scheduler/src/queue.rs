//! The scheduling queue: active (highest priority first, then oldest), backoff (1 s doubling to
//! 10 s per failed attempt) and unschedulable (parked until a cluster event may help, or for at
//! most 5 minutes), as upstream's PriorityQueue.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::cache::PodInfo;

pub const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
pub const MAX_UNSCHEDULABLE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Place {
    Active,
    Backoff(Instant),
    Unschedulable(Instant),
    InFlight,
}

struct Entry {
    info: Arc<PodInfo>,
    place: Place,
    seq: u64,
    attempts: u32,
    /// When the pod first entered the queue (queue-sort tie-break and latency).
    since: Instant,
    /// The move counter when the pod was popped.
    popped_at_move: u64,
    /// Updated while in flight: schedule it again whatever the outcome.
    dirty: bool,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    active: BinaryHeap<(i32, Reverse<Instant>, Reverse<u64>, String)>,
    backoff: BinaryHeap<Reverse<(Instant, u64, String)>>,
    seq: u64,
    moves: u64,
    closed: bool,
    /// Keys of parked (unschedulable) pods, so that cluster events cost what is parked.
    parked: std::collections::HashSet<String>,
}

/// What became of a popped pod.
pub enum Outcome {
    /// Bound (or gone): it leaves the queue.
    Done,
    /// No node fits: park it until something changes.
    Unschedulable,
    /// Something failed (a bind error): retry after backoff.
    Error,
}

#[derive(Default)]
pub struct Queue {
    inner: Mutex<Inner>,
    notify: Notify,
}

/// A pod handed to the scheduling cycle.
pub struct Popped {
    pub info: Arc<PodInfo>,
    pub attempts: u32,
    pub since: Instant,
}

fn backoff_for(attempts: u32) -> Duration {
    let shift = attempts.saturating_sub(1).min(10);
    (INITIAL_BACKOFF * (1u32 << shift)).min(MAX_BACKOFF)
}

impl Inner {
    fn push_active(&mut self, key: &str) {
        self.parked.remove(key);
        self.seq += 1;
        let seq = self.seq;
        if let Some(e) = self.entries.get_mut(key) {
            e.place = Place::Active;
            e.seq = seq;
            self.active.push((
                e.info.priority,
                Reverse(e.since),
                Reverse(seq),
                key.to_string(),
            ));
        }
    }

    fn push_backoff(&mut self, key: &str, until: Instant) {
        self.parked.remove(key);
        self.seq += 1;
        let seq = self.seq;
        if let Some(e) = self.entries.get_mut(key) {
            e.place = Place::Backoff(until);
            e.seq = seq;
            self.backoff.push(Reverse((until, seq, key.to_string())));
        }
    }

    fn flush_backoff(&mut self, now: Instant) {
        while let Some(Reverse((until, seq, key))) = self.backoff.peek().cloned() {
            if until > now {
                break;
            }
            self.backoff.pop();
            let valid = self
                .entries
                .get(&key)
                .is_some_and(|e| e.seq == seq && matches!(e.place, Place::Backoff(_)));
            if valid {
                self.push_active(&key);
            }
        }
    }
}

impl Queue {
    pub fn new() -> Arc<Queue> {
        Arc::new(Queue::default())
    }

    /// A pending pod appeared or changed.
    pub fn add_or_update(&self, info: Arc<PodInfo>) {
        let mut q = self.inner.lock().unwrap();
        let key = info.key.clone();
        match q.entries.get_mut(&key) {
            Some(e) => {
                e.info = info;
                match e.place {
                    Place::InFlight => e.dirty = true,
                    // An update may make it schedulable: try again (after its backoff).
                    Place::Unschedulable(_) => {
                        let until = Instant::now();
                        q.push_backoff(&key, until);
                    }
                    Place::Active | Place::Backoff(_) => {}
                }
            }
            None => {
                q.entries.insert(
                    key.clone(),
                    Entry {
                        info,
                        place: Place::Active,
                        seq: 0,
                        attempts: 0,
                        since: Instant::now(),
                        popped_at_move: 0,
                        dirty: false,
                    },
                );
                q.push_active(&key);
            }
        }
        drop(q);
        self.notify.notify_one();
    }

    /// The pod is gone or no longer pending.
    pub fn delete(&self, key: &str) {
        let mut q = self.inner.lock().unwrap();
        q.entries.remove(key);
        q.parked.remove(key);
    }

    /// A cluster event that may make parked pods schedulable (node added or changed, pod
    /// deleted, ...): move every unschedulable pod to backoff (or active if its backoff is over).
    pub fn move_all(&self) {
        let mut q = self.inner.lock().unwrap();
        q.moves += 1;
        if q.parked.is_empty() {
            return;
        }
        let parked: Vec<(String, u32)> = q
            .parked
            .iter()
            .filter_map(|k| q.entries.get(k).map(|e| (k.clone(), e.attempts)))
            .collect();
        for (key, attempts) in parked {
            q.push_backoff(&key, Instant::now() + backoff_for(attempts) / 2);
        }
        drop(q);
        self.notify.notify_one();
    }

    /// Pods parked longer than MAX_UNSCHEDULABLE go back to active (call periodically).
    pub fn flush_unschedulable(&self) {
        let mut q = self.inner.lock().unwrap();
        let now = Instant::now();
        let stale: Vec<String> = q
            .parked
            .iter()
            .filter(|k| {
                q.entries.get(*k).is_some_and(
                    |e| matches!(e.place, Place::Unschedulable(t) if now - t > MAX_UNSCHEDULABLE),
                )
            })
            .cloned()
            .collect();
        for key in stale {
            q.push_active(&key);
        }
        drop(q);
        self.notify.notify_one();
    }

    /// The next pod to schedule; waits until there is one. None once closed.
    pub async fn pop(&self) -> Option<Popped> {
        loop {
            let notified = self.notify.notified();
            let wait = {
                let mut q = self.inner.lock().unwrap();
                if q.closed {
                    return None;
                }
                let now = Instant::now();
                q.flush_backoff(now);
                while let Some((_, _, Reverse(seq), key)) = q.active.pop() {
                    let moves = q.moves;
                    let Some(e) = q.entries.get_mut(&key) else {
                        continue;
                    };
                    if e.seq != seq || e.place != Place::Active {
                        continue;
                    }
                    e.place = Place::InFlight;
                    e.popped_at_move = moves;
                    e.dirty = false;
                    e.attempts += 1;
                    return Some(Popped {
                        info: e.info.clone(),
                        attempts: e.attempts,
                        since: e.since,
                    });
                }
                q.backoff
                    .peek()
                    .map(|Reverse((until, _, _))| until.saturating_duration_since(now))
            };
            match wait {
                Some(d) => {
                    let _ = tokio::time::timeout(d, notified).await;
                }
                None => notified.await,
            }
        }
    }

    /// Report what became of a popped pod.
    pub fn done(&self, key: &str, outcome: Outcome) {
        let mut q = self.inner.lock().unwrap();
        let moves = q.moves;
        let Some(e) = q.entries.get_mut(key) else {
            return;
        };
        if e.place != Place::InFlight {
            return;
        }
        let attempts = e.attempts;
        let (dirty, moved) = (e.dirty, e.popped_at_move != moves);
        match outcome {
            Outcome::Done => {
                q.entries.remove(key);
            }
            Outcome::Unschedulable if !dirty && !moved => {
                e.place = Place::Unschedulable(Instant::now());
                q.parked.insert(key.to_string());
            }
            // Something changed while it was being scheduled, or an error: retry after backoff.
            Outcome::Unschedulable | Outcome::Error => {
                q.push_backoff(key, Instant::now() + backoff_for(attempts));
            }
        }
        drop(q);
        self.notify.notify_one();
    }

    pub fn close(&self) {
        self.inner.lock().unwrap().closed = true;
        self.notify.notify_waiters();
        self.notify.notify_one();
    }

    /// (active, backoff, unschedulable, in flight), for logs and tests.
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        let q = self.inner.lock().unwrap();
        let mut c = (0, 0, 0, 0);
        for e in q.entries.values() {
            match e.place {
                Place::Active => c.0 += 1,
                Place::Backoff(_) => c.1 += 1,
                Place::Unschedulable(_) => c.2 += 1,
                Place::InFlight => c.3 += 1,
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    fn info(name: &str, priority: i32) -> Arc<PodInfo> {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "d", "uid": name},
            "spec": {"priority": priority, "containers": [{"name": "c"}]},
        }))
        .unwrap();
        Arc::new(PodInfo::new(Arc::new(pod)))
    }

    #[tokio::test]
    async fn priority_then_age_and_parking() {
        let q = Queue::new();
        q.add_or_update(info("low", 0));
        q.add_or_update(info("high", 10));
        q.add_or_update(info("low2", 0));
        assert_eq!(q.pop().await.unwrap().info.key, "d/high");
        assert_eq!(q.pop().await.unwrap().info.key, "d/low");
        q.done("d/high", Outcome::Done);
        q.done("d/low", Outcome::Unschedulable);
        assert_eq!(q.counts(), (1, 0, 1, 0));
        assert_eq!(q.pop().await.unwrap().info.key, "d/low2");
        // A cluster event moves the parked pod to backoff; it comes back once that is over.
        q.move_all();
        assert_eq!(q.counts(), (0, 1, 0, 1));
        let again = tokio::time::timeout(Duration::from_secs(5), q.pop())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.info.key, "d/low");
        assert_eq!(again.attempts, 2);
    }

    #[tokio::test]
    async fn an_event_during_the_cycle_sends_the_pod_to_backoff_not_parking() {
        let q = Queue::new();
        q.add_or_update(info("p", 0));
        let p = q.pop().await.unwrap();
        q.move_all();
        q.done(&p.info.key, Outcome::Unschedulable);
        assert_eq!(q.counts(), (0, 1, 0, 0));
        q.delete(&p.info.key);
        assert_eq!(q.counts(), (0, 0, 0, 0));
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        assert_eq!(backoff_for(1), Duration::from_secs(1));
        assert_eq!(backoff_for(3), Duration::from_secs(4));
        assert_eq!(backoff_for(9), MAX_BACKOFF);
    }
}
