//! DefaultPreemption: when no node fits, find a node where evicting lower-priority pods makes
//! room, choosing victims and nodes as upstream does (fewest and least important victims).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::cache::{Cache, PodInfo};
use crate::framework::{Code, CycleState, Nomination, Plugin, Profile, Status};

pub struct DefaultPreemption;

impl Plugin for DefaultPreemption {
    fn name(&self) -> &'static str {
        "DefaultPreemption"
    }

    fn post_filter(
        &self,
        state: &CycleState,
        pod: &PodInfo,
        cache: &Cache,
        statuses: &HashMap<String, Status>,
        profile: &Profile,
    ) -> Option<Result<Nomination, String>> {
        let never = pod
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.preemption_policy.as_deref())
            == Some("Never");
        let total = cache.nodes.len();
        if never {
            return Some(Err(format!(
                "preemption: 0/{total} nodes are available: {total} Preemption is not helpful for scheduling."
            )));
        }
        let mut not_helpful = 0;
        let mut no_victims = 0;
        // (highest victim priority, sum of victim priorities, victims, node)
        let mut best: Option<(i32, i64, usize, Nomination)> = None;
        for node in &cache.nodes {
            match statuses.get(&node.name).map(|s| s.code) {
                Some(Code::Unschedulable) => {}
                _ => {
                    not_helpful += 1;
                    continue;
                }
            }
            // Everything of lower priority goes; then reprieve, most important first, whatever
            // still leaves room.
            // Pods already terminating are going anyway: not victims, and not counted.
            let terminating: HashSet<String> = node
                .pods
                .iter()
                .filter(|p| p.pod.metadata.deletion_timestamp.is_some())
                .map(|p| p.uid.clone())
                .collect();
            let mut lower: Vec<Arc<PodInfo>> = node
                .pods
                .iter()
                .filter(|p| p.priority < pod.priority && !terminating.contains(&p.uid))
                .cloned()
                .collect();
            if lower.is_empty() {
                no_victims += 1;
                continue;
            }
            let mut removed: HashSet<String> = lower.iter().map(|p| p.uid.clone()).collect();
            removed.extend(terminating.iter().cloned());
            if !profile
                .run_filters(state, pod, &node.without(&removed))
                .is_success()
            {
                no_victims += 1;
                continue;
            }
            lower.sort_by_key(|p| std::cmp::Reverse(p.priority));
            let mut victims = Vec::new();
            for p in lower {
                removed.remove(&p.uid);
                if !profile
                    .run_filters(state, pod, &node.without(&removed))
                    .is_success()
                {
                    removed.insert(p.uid.clone());
                    victims.push(p);
                }
            }
            let top = victims.iter().map(|v| v.priority).max().unwrap_or(i32::MIN);
            let sum: i64 = victims.iter().map(|v| v.priority as i64).sum();
            let candidate = (
                top,
                sum,
                victims.len(),
                Nomination {
                    node: node.name.clone(),
                    victims,
                },
            );
            let better = match &best {
                None => true,
                Some(b) => (candidate.0, candidate.1, candidate.2) < (b.0, b.1, b.2),
            };
            if better {
                best = Some(candidate);
            }
        }
        match best {
            Some((_, _, _, n)) => Some(Ok(n)),
            None => {
                let mut parts = Vec::new();
                if no_victims > 0 {
                    parts.push(format!(
                        "{no_victims} No preemption victims found for incoming pod"
                    ));
                }
                if not_helpful > 0 {
                    parts.push(format!(
                        "{not_helpful} Preemption is not helpful for scheduling"
                    ));
                }
                parts.sort();
                Some(Err(format!(
                    "preemption: 0/{total} nodes are available: {}.",
                    parts.join(", ")
                )))
            }
        }
    }
}
