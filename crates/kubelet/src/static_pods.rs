//! Static pods: pod manifests in a directory (`<node dir>/pod-manifests` by default), run by
//! this kubelet without a scheduler, each mirrored in the API as `<name>-<node>` with upstream's
//! annotations (`kubernetes.io/config.source: file`, `config.hash`, `config.mirror`) and the
//! Node as owner. The directory is read every 5 s: a new file makes a mirror pod (which the
//! kubelet then runs like any pod bound to it), a changed file replaces it, a removed file
//! deletes it, and a mirror pod deleted through the API comes back.
//!
//! Difference from upstream: the containers run for the mirror pod, so replacing or deleting
//! the mirror pod restarts them (upstream keeps a static pod running while its mirror is gone).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::ResourceExt;
use serde_json::{json, Value};

use crate::pods::Kubelet;

pub const SOURCE: &str = "kubernetes.io/config.source";
pub const HASH: &str = "kubernetes.io/config.hash";
pub const MIRROR: &str = "kubernetes.io/config.mirror";

fn hash(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The mirror pods the manifests in `dir` ask for, by namespace/name; unreadable files are
/// reported and skipped.
pub fn desired(dir: &Path, node: &str, node_uid: &str) -> HashMap<(String, String), Value> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        let ext = path.extension().and_then(|x| x.to_str()).unwrap_or("");
        if !matches!(ext, "yaml" | "yml" | "json") {
            continue;
        }
        let Ok(data) = std::fs::read(&path) else {
            continue;
        };
        let parsed: Result<Value, String> = if ext == "json" {
            serde_json::from_slice(&data).map_err(|e| e.to_string())
        } else {
            serde_norway::from_slice(&data).map_err(|e| e.to_string())
        };
        let mut pod = match parsed {
            Ok(v) if v["kind"] == "Pod" && v["metadata"]["name"].is_string() => v,
            Ok(_) => {
                tracing::warn!(file = %path.display(), "a static pod manifest must be one Pod with a name");
                continue;
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "unreadable static pod manifest");
                continue;
            }
        };
        let h = hash(&data);
        let name = format!(
            "{}-{node}",
            pod["metadata"]["name"].as_str().unwrap_or_default()
        );
        let ns = pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        pod["metadata"]["name"] = json!(name);
        pod["metadata"]["namespace"] = json!(ns);
        let annotations = pod["metadata"]
            .as_object_mut()
            .map(|m| m.entry("annotations").or_insert_with(|| json!({})));
        if let Some(a) = annotations {
            a[SOURCE] = json!("file");
            a[HASH] = json!(h);
            a[MIRROR] = json!(h);
        }
        pod["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid, "controller": true,
        }]);
        pod["spec"]["nodeName"] = json!(node);
        out.insert((ns, name), pod);
    }
    out
}

/// Keeps the mirror pods in line with the manifest directory, forever.
pub async fn run(k: std::sync::Arc<Kubelet>, dir: PathBuf) {
    let _ = std::fs::create_dir_all(&dir);
    let all: Api<Pod> = Api::all(k.client.clone());
    let nodes: Api<Node> = Api::all(k.client.clone());
    let mut node_uid: Option<String> = None;
    // Unknown at start: an earlier run may have left mirror pods behind.
    let mut mirrors = true;
    loop {
        // With no manifests and no mirror pods there is nothing to ask the API.
        if mirrors || has_manifests(&dir) {
            match sync(&k, &dir, &all, &nodes, &mut node_uid).await {
                Ok(n) => mirrors = n > 0,
                Err(e) => tracing::warn!(error = %e, "static pods"),
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

fn has_manifests(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let p = e.path();
            matches!(
                p.extension().and_then(|x| x.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
    })
}

/// One round; returns how many mirror pods the manifests ask for.
async fn sync(
    k: &Kubelet,
    dir: &Path,
    all: &Api<Pod>,
    nodes: &Api<Node>,
    node_uid: &mut Option<String>,
) -> anyhow::Result<usize> {
    if node_uid.is_none() {
        *node_uid = Some(nodes.get(&k.node).await?.uid().unwrap_or_default());
    }
    let want = desired(dir, &k.node, node_uid.as_deref().unwrap_or_default());
    let wanted = want.len();
    let lp = ListParams::default().fields(&format!("spec.nodeName={}", k.node));
    let have: Vec<Pod> = all
        .list(&lp)
        .await?
        .items
        .into_iter()
        .filter(|p| p.annotations().contains_key(MIRROR))
        .collect();
    for p in &have {
        let key = (p.namespace().unwrap_or_default(), p.name_any());
        let same = want.get(&key).is_some_and(|w| {
            p.annotations().get(HASH).map(String::as_str)
                == w["metadata"]["annotations"][HASH].as_str()
        });
        if !same && p.metadata.deletion_timestamp.is_none() {
            let api: Api<Pod> = Api::namespaced(k.client.clone(), &key.0);
            tracing::info!(pod = %key.1, "static pod manifest changed or removed: deleting its mirror pod");
            api.delete(&key.1, &DeleteParams::default()).await?;
        }
    }
    for ((ns, name), pod) in want {
        if have
            .iter()
            .any(|p| p.namespace().as_deref() == Some(ns.as_str()) && p.name_any() == name)
        {
            continue;
        }
        let api: Api<Pod> = Api::namespaced(k.client.clone(), &ns);
        let pod: Pod = serde_json::from_value(pod)?;
        match api.create(&PostParams::default(), &pod).await {
            Ok(_) => tracing::info!(pod = %name, "mirror pod created"),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => tracing::warn!(pod = %name, error = %e, "creating a mirror pod"),
        }
    }
    Ok(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_become_mirror_pods() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("web.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: kube-system}\nspec:\n  containers: [{name: c, image: busybox}]\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        std::fs::write(dir.path().join("bad.yaml"), "kind: Service\n").unwrap();
        let d = desired(dir.path(), "n1", "uid-1");
        assert_eq!(d.len(), 1);
        let p = &d[&("kube-system".to_string(), "web-n1".to_string())];
        assert_eq!(p["spec"]["nodeName"], "n1");
        assert_eq!(p["metadata"]["annotations"][SOURCE], "file");
        assert_eq!(p["metadata"]["ownerReferences"][0]["kind"], "Node");
        let h1 = p["metadata"]["annotations"][HASH].clone();
        std::fs::write(
            dir.path().join("web.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: kube-system}\nspec:\n  containers: [{name: c, image: busybox:2}]\n",
        )
        .unwrap();
        let d = desired(dir.path(), "n1", "uid-1");
        assert_ne!(
            d[&("kube-system".to_string(), "web-n1".to_string())]["metadata"]["annotations"][HASH],
            h1
        );
    }
}
