//! The API server's own metrics, served at `/metrics` in the Prometheus text format to any
//! authenticated user. Today one family, named and labelled as upstream's:
//! `apiserver_request_total{verb, group, version, resource, subresource, code}`, one count per
//! resource request once its response status is known (a watch counts when it starts).
//! Verbs are upstream's canonical ones: GET, LIST, WATCH, POST, PUT, PATCH, APPLY (a
//! server-side apply patch), DELETE, DELETECOLLECTION.

use prometheus_client::encoding::{text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// One request's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub verb: &'static str,
    pub group: &'static str,
    pub version: &'static str,
    pub resource: &'static str,
    pub subresource: String,
    pub code: String,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "apiserver_request",
            "Counter of apiserver requests broken out for each verb, group, version, resource, subresource and HTTP response code.",
            requests.clone(),
        );
        Metrics { registry, requests }
    }
}

impl Metrics {
    /// Count one request that got `code`.
    pub fn request(&self, labels: RequestLabels) {
        self.requests.get_or_create(&labels).inc();
    }

    /// Everything, in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = text::encode(&mut out, &self.registry);
        out
    }
}

/// Upstream's canonical verb for a request: `verb` as authorization names it, with a
/// server-side apply patch told apart from the other patches.
pub fn canonical_verb(verb: &str, content_type: Option<&str>) -> &'static str {
    match verb {
        "get" => "GET",
        "list" => "LIST",
        "watch" => "WATCH",
        "create" => "POST",
        "update" => "PUT",
        "patch" if content_type.is_some_and(|c| c.starts_with("application/apply-patch")) => {
            "APPLY"
        }
        "patch" => "PATCH",
        "delete" => "DELETE",
        "deletecollection" => "DELETECOLLECTION",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(verb: &'static str, code: &str) -> RequestLabels {
        RequestLabels {
            verb,
            group: "",
            version: "v1",
            resource: "pods",
            subresource: String::new(),
            code: code.to_string(),
        }
    }

    #[test]
    fn counts_per_label_set_in_the_text_format() {
        let m = Metrics::default();
        m.request(labels("POST", "201"));
        m.request(labels("POST", "201"));
        m.request(labels("POST", "409"));
        let text = m.render();
        assert!(text.contains("# TYPE apiserver_request counter"), "{text}");
        let line = |code: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("apiserver_request_total{")
                        && l.contains(&format!("code=\"{code}\""))
                })
                .map(|l| l.rsplit(' ').next().unwrap_or_default().to_string())
        };
        assert_eq!(line("201").as_deref(), Some("2"), "{text}");
        assert_eq!(line("409").as_deref(), Some("1"), "{text}");
        assert!(text.contains("verb=\"POST\"") && text.contains("resource=\"pods\""));
    }

    #[test]
    fn canonical_verbs_as_upstream() {
        assert_eq!(canonical_verb("list", None), "LIST");
        assert_eq!(canonical_verb("create", None), "POST");
        assert_eq!(
            canonical_verb("patch", Some("application/apply-patch+yaml")),
            "APPLY"
        );
        assert_eq!(
            canonical_verb("patch", Some("application/merge-patch+json")),
            "PATCH"
        );
        assert_eq!(canonical_verb("deletecollection", None), "DELETECOLLECTION");
    }
}
