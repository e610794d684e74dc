//! Label selectors, node selector terms and tolerations, as upstream evaluates them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{NodeSelectorRequirement, NodeSelectorTerm, Taint, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether `labels` match a LabelSelector (an empty selector matches everything).
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    for (k, v) in sel.match_labels.iter().flatten() {
        if labels.get(k) != Some(v) {
            return false;
        }
    }
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.as_deref().unwrap_or_default();
        let got = labels.get(&e.key);
        let ok = match e.operator.as_str() {
            "In" => got.is_some_and(|g| values.contains(g)),
            "NotIn" => !got.is_some_and(|g| values.contains(g)),
            "Exists" => got.is_some(),
            "DoesNotExist" => got.is_none(),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&String>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => !value.is_some_and(|v| values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if r.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

/// One NodeSelectorTerm: every expression and every field requirement must hold. A term with
/// nothing in it matches nothing (upstream).
pub fn term_matches(
    term: &NodeSelectorTerm,
    labels: &BTreeMap<String, String>,
    node_name: &str,
) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, labels.get(&r.key)))
        && fields.iter().all(|r| {
            let name = node_name.to_string();
            r.key == "metadata.name" && requirement_matches(r, Some(&name))
        })
}

/// Whether a toleration tolerates a taint.
pub fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    if let Some(effect) = t.effect.as_deref() {
        if !effect.is_empty() && effect != taint.effect {
            return false;
        }
    }
    let key = t.key.as_deref().unwrap_or_default();
    if !key.is_empty() && key != taint.key {
        return false;
    }
    match t.operator.as_deref().unwrap_or("Equal") {
        "Exists" => true,
        _ => {
            // An empty key with Equal is invalid upstream; treat it as no match.
            !key.is_empty()
                && t.value.as_deref().unwrap_or_default()
                    == taint.value.as_deref().unwrap_or_default()
        }
    }
}

pub fn tolerated(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| tolerates(t, taint))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selectors() {
        let sel: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]},
                                  {"key": "x", "operator": "DoesNotExist"}]
        }))
        .unwrap();
        assert!(selector_matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "a")])
        ));
        assert!(!selector_matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "c")])
        ));
        assert!(!selector_matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "a"), ("x", "1")])
        ));
        assert!(selector_matches(&LabelSelector::default(), &labels(&[])));
    }

    #[test]
    fn node_terms_and_tolerations() {
        let term: NodeSelectorTerm = serde_json::from_value(serde_json::json!({
            "matchExpressions": [{"key": "cores", "operator": "Gt", "values": ["4"]}],
            "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]
        }))
        .unwrap();
        assert!(term_matches(&term, &labels(&[("cores", "8")]), "n1"));
        assert!(!term_matches(&term, &labels(&[("cores", "8")]), "n2"));
        assert!(!term_matches(&term, &labels(&[("cores", "2")]), "n1"));
        assert!(!term_matches(
            &NodeSelectorTerm::default(),
            &labels(&[]),
            "n1"
        ));
        let taint: Taint = serde_json::from_value(
            serde_json::json!({"key": "k", "value": "v", "effect": "NoSchedule"}),
        )
        .unwrap();
        let t = |v: serde_json::Value| -> Toleration { serde_json::from_value(v).unwrap() };
        assert!(tolerates(
            &t(serde_json::json!({"key": "k", "value": "v"})),
            &taint
        ));
        assert!(tolerates(
            &t(serde_json::json!({"operator": "Exists"})),
            &taint
        ));
        assert!(!tolerates(
            &t(serde_json::json!({"key": "k", "value": "w"})),
            &taint
        ));
        assert!(!tolerates(
            &t(serde_json::json!({"key": "k", "operator": "Exists", "effect": "NoExecute"})),
            &taint
        ));
    }
}
