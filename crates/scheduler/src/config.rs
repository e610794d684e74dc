//! KubeSchedulerConfiguration (kubescheduler.config.k8s.io/v1): profiles by schedulerName,
//! plugins enabled and disabled per extension point, score weights, percentageOfNodesToScore,
//! and NodeResourcesFit's scoring strategy.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::framework::{Plugin, Profile};
use crate::plugins::{registry, ScoringStrategy};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Configuration {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub percentage_of_nodes_to_score: Option<u32>,
    #[serde(default)]
    pub profiles: Vec<ProfileConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProfileConfig {
    #[serde(default)]
    pub scheduler_name: Option<String>,
    #[serde(default)]
    pub percentage_of_nodes_to_score: Option<u32>,
    #[serde(default)]
    pub plugins: Option<Plugins>,
    #[serde(default)]
    pub plugin_config: Vec<PluginConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plugins {
    #[serde(default)]
    pub multi_point: PluginSet,
    #[serde(default)]
    pub pre_filter: PluginSet,
    #[serde(default)]
    pub filter: PluginSet,
    #[serde(default)]
    pub post_filter: PluginSet,
    #[serde(default)]
    pub pre_score: PluginSet,
    #[serde(default)]
    pub score: PluginSet,
    #[serde(default)]
    pub reserve: PluginSet,
    #[serde(default)]
    pub permit: PluginSet,
    #[serde(default)]
    pub pre_bind: PluginSet,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PluginSet {
    #[serde(default)]
    pub enabled: Vec<PluginRef>,
    #[serde(default)]
    pub disabled: Vec<PluginRef>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PluginRef {
    pub name: String,
    #[serde(default)]
    pub weight: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PluginConfig {
    pub name: String,
    #[serde(default)]
    pub args: serde_json::Value,
}

/// Upstream's default score weights.
const DEFAULT_SCORE: &[(&str, i64)] = &[
    ("TaintToleration", 3),
    ("NodeAffinity", 2),
    ("NodeResourcesFit", 1),
    ("PodTopologySpread", 2),
    ("InterPodAffinity", 2),
    ("NodeResourcesBalancedAllocation", 1),
    ("ImageLocality", 1),
];
const DEFAULT_FILTER: &[&str] = &[
    "NodeUnschedulable",
    "NodeName",
    "TaintToleration",
    "NodeAffinity",
    "NodePorts",
    "NodeResourcesFit",
    "PodTopologySpread",
    "InterPodAffinity",
];
const DEFAULT_PRE_FILTER: &[&str] = &["PodTopologySpread", "InterPodAffinity"];
const DEFAULT_POST_FILTER: &[&str] = &["DefaultPreemption"];

impl Configuration {
    pub fn parse(text: &str) -> Result<Configuration> {
        let c: Configuration =
            serde_norway::from_str(text).context("parsing the scheduler configuration")?;
        if !c.kind.is_empty() && c.kind != "KubeSchedulerConfiguration" {
            bail!("kind {} is not KubeSchedulerConfiguration", c.kind);
        }
        if !c.api_version.is_empty() && !c.api_version.starts_with("kubescheduler.config.k8s.io/") {
            bail!(
                "apiVersion {} is not kubescheduler.config.k8s.io",
                c.api_version
            );
        }
        Ok(c)
    }

    /// The profiles, by scheduler name (`default-scheduler` when none are configured).
    pub fn profiles(&self) -> Result<HashMap<String, Arc<Profile>>> {
        let default = [ProfileConfig::default()];
        let configs: &[ProfileConfig] = if self.profiles.is_empty() {
            &default
        } else {
            &self.profiles
        };
        let mut out = HashMap::new();
        for pc in configs {
            let name = pc
                .scheduler_name
                .clone()
                .unwrap_or_else(|| "default-scheduler".into());
            let profile = build(pc, &name, self.percentage_of_nodes_to_score.unwrap_or(0))?;
            if out.insert(name.clone(), Arc::new(profile)).is_some() {
                bail!("two profiles named {name}");
            }
        }
        Ok(out)
    }
}

fn apply(
    defaults: Vec<(String, i64)>,
    sets: &[&PluginSet],
    known: &HashMap<&'static str, Arc<dyn Plugin>>,
) -> Result<Vec<(String, i64)>> {
    let mut list = defaults;
    for set in sets {
        for d in &set.disabled {
            if d.name == "*" {
                list.clear();
            } else {
                list.retain(|(n, _)| n != &d.name);
            }
        }
        for e in &set.enabled {
            if !known.contains_key(e.name.as_str()) {
                bail!("unknown plugin {:?}", e.name);
            }
            list.retain(|(n, _)| n != &e.name);
            list.push((e.name.clone(), e.weight.unwrap_or(1)));
        }
    }
    Ok(list)
}

fn build(pc: &ProfileConfig, name: &str, global_pct: u32) -> Result<Profile> {
    let mut strategy = ScoringStrategy::LeastAllocated;
    for c in &pc.plugin_config {
        if c.name == "NodeResourcesFit" {
            match c.args["scoringStrategy"]["type"].as_str() {
                None | Some("LeastAllocated") => {}
                Some("MostAllocated") => strategy = ScoringStrategy::MostAllocated,
                Some(other) => bail!("NodeResourcesFit scoringStrategy {other} is not supported"),
            }
        }
    }
    let known: HashMap<&'static str, Arc<dyn Plugin>> = registry(strategy)
        .into_iter()
        .map(|p| (p.name(), p))
        .collect();
    let empty = Plugins::default();
    let plugins = pc.plugins.as_ref().unwrap_or(&empty);
    let names = |d: &[&str]| d.iter().map(|n| (n.to_string(), 0)).collect::<Vec<_>>();
    let pick = |list: Vec<(String, i64)>| -> Vec<Arc<dyn Plugin>> {
        list.into_iter()
            .map(|(n, _)| known[n.as_str()].clone())
            .collect()
    };
    let mp = &plugins.multi_point;
    let filter = apply(names(DEFAULT_FILTER), &[mp, &plugins.filter], &known)?;
    let pre_filter = apply(
        names(DEFAULT_PRE_FILTER),
        &[mp, &plugins.pre_filter],
        &known,
    )?;
    let post_filter = apply(
        names(DEFAULT_POST_FILTER),
        &[mp, &plugins.post_filter],
        &known,
    )?;
    let defaults = DEFAULT_SCORE
        .iter()
        .map(|(n, w)| (n.to_string(), *w))
        .collect();
    let score = apply(defaults, &[mp, &plugins.score], &known)?;
    let reserve = apply(vec![], &[&plugins.reserve], &known)?;
    let permit = apply(vec![], &[&plugins.permit], &known)?;
    let pre_bind = apply(vec![], &[&plugins.pre_bind], &known)?;
    Ok(Profile {
        scheduler_name: name.to_string(),
        pre_filter: pick(pre_filter).into_iter().collect(),
        filter: pick(filter)
            .into_iter()
            .filter(|p| p.has_filter())
            .collect(),
        post_filter: pick(post_filter),
        score: score
            .into_iter()
            .filter(|(n, _)| known[n.as_str()].has_score())
            .map(|(n, w)| (known[n.as_str()].clone(), w))
            .collect(),
        reserve: pick(reserve),
        permit: pick(permit),
        pre_bind: pick(pre_bind),
        percentage_of_nodes_to_score: pc.percentage_of_nodes_to_score.unwrap_or(global_pct),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = Configuration::default().profiles().unwrap();
        let p = &c["default-scheduler"];
        assert_eq!(p.filter.len(), 8);
        assert_eq!(p.score.len(), 7);
        let c = Configuration::parse(
            r#"
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
percentageOfNodesToScore: 30
profiles:
- schedulerName: default-scheduler
- schedulerName: packer
  plugins:
    score:
      disabled: [{name: "*"}]
      enabled: [{name: NodeResourcesFit, weight: 5}]
    filter:
      disabled: [{name: NodePorts}]
  pluginConfig:
  - name: NodeResourcesFit
    args: {scoringStrategy: {type: MostAllocated}}
"#,
        )
        .unwrap();
        let profiles = c.profiles().unwrap();
        let packer = &profiles["packer"];
        assert_eq!(packer.score.len(), 1);
        assert_eq!(packer.score[0].1, 5);
        assert!(packer.filter.iter().all(|p| p.name() != "NodePorts"));
        assert_eq!(packer.percentage_of_nodes_to_score, 30);
        // MostAllocated prefers the fuller node.
        let node = |name: &str, used: &str| {
            let mut c = crate::cache::Cache::default();
            c.upsert_node(
                serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"}}}))
                .unwrap(),
            );
            if used != "0" {
                let p: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": "x", "namespace": "d", "uid": "x"},
                    "spec": {"nodeName": name, "containers": [{"name": "c", "resources": {"requests": {"cpu": used}}}]}})).unwrap();
                c.upsert_bound_pod(std::sync::Arc::new(p));
            }
            c
        };
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "y", "namespace": "d", "uid": "y"},
            "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "100m"}}}]}}))
        .unwrap();
        let pod = crate::cache::PodInfo::new(std::sync::Arc::new(pod));
        let state = crate::framework::CycleState::default();
        let (full, empty) = (node("a", "100m"), node("b", "0"));
        let fit = &packer.score[0].0;
        assert!(
            fit.score(&state, &pod, full.node("a").unwrap())
                > fit.score(&state, &pod, empty.node("b").unwrap())
        );
        assert!(Configuration::parse("kind: Other").is_err());
        let bad = Configuration::parse("profiles: [{plugins: {score: {enabled: [{name: Nope}]}}}]")
            .unwrap();
        assert!(bad.profiles().is_err());
    }
}
