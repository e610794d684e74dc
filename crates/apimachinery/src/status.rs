//! `metav1.Status`: how every error reaches a client.

use serde_json::{json, Value};

/// One field-level cause of an error (`details.causes[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    /// e.g. `FieldValueInvalid`, `FieldValueRequired`, `FieldValueNotSupported`.
    pub reason: String,
    pub message: String,
    pub field: String,
}

impl Cause {
    pub fn new(reason: &str, field: &str, message: impl Into<String>) -> Self {
        Cause {
            reason: reason.into(),
            field: field.into(),
            message: message.into(),
        }
    }
    pub fn invalid(field: &str, value: impl std::fmt::Display, detail: &str) -> Self {
        Cause::new(
            "FieldValueInvalid",
            field,
            format!("Invalid value: \"{value}\": {detail}"),
        )
    }
    pub fn required(field: &str) -> Self {
        Cause::new("FieldValueRequired", field, "Required value")
    }
    pub fn not_supported(field: &str, value: &str, supported: &[&str]) -> Self {
        let list: Vec<String> = supported.iter().map(|s| format!("\"{s}\"")).collect();
        Cause::new(
            "FieldValueNotSupported",
            field,
            format!(
                "Unsupported value: \"{value}\": supported values: {}",
                list.join(", ")
            ),
        )
    }
    /// `field: message`, as upstream joins causes into the Status message.
    pub fn render(&self) -> String {
        if self.field.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", self.field, self.message)
        }
    }
}

/// An API error: becomes a `Status` with the same code and reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} ({code}): {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    /// Boxed: errors travel through every `Result` in the server and should stay small.
    pub details: Box<Details>,
}

/// `details` of a Status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Details {
    pub group: String,
    pub kind: String,
    pub name: String,
    pub causes: Vec<Cause>,
    pub retry_after_seconds: Option<u32>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: Box::default(),
        }
    }
    /// Attach `details.{group,kind,name}`.
    pub fn on(mut self, group: &str, kind: &str, name: &str) -> Self {
        self.details.group = group.into();
        self.details.kind = kind.into();
        self.details.name = name.into();
        self
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "BadRequest", message)
    }
    pub fn unauthorized() -> Self {
        ApiError::new(401, "Unauthorized", "Unauthorized")
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::new(403, "Forbidden", message)
    }
    /// `resource` is the plural resource with its group (`pods`, `deployments.apps`).
    pub fn not_found(resource: &str, name: &str) -> Self {
        ApiError::new(404, "NotFound", format!("{resource} \"{name}\" not found"))
    }
    pub fn not_found_path() -> Self {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }
    pub fn already_exists(resource: &str, name: &str) -> Self {
        ApiError::new(
            409,
            "AlreadyExists",
            format!("{resource} \"{name}\" already exists"),
        )
    }
    pub fn conflict(resource: &str, name: &str, why: &str) -> Self {
        ApiError::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {resource} \"{name}\": {why}"),
        )
    }
    pub fn gone(message: impl Into<String>) -> Self {
        ApiError::new(410, "Expired", message)
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        ApiError::new(413, "RequestEntityTooLarge", message)
    }
    pub fn unsupported_media_type(content_type: &str) -> Self {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json, application/yaml; got \"{content_type}\""),
        )
    }
    pub fn method_not_allowed(method: &str) -> Self {
        ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )
    }
    pub fn invalid(kind: &str, name: &str, causes: Vec<Cause>) -> Self {
        let rendered: Vec<String> = causes.iter().map(Cause::render).collect();
        let message = if rendered.len() == 1 {
            format!("{kind} \"{name}\" is invalid: {}", rendered[0])
        } else {
            format!("{kind} \"{name}\" is invalid: [{}]", rendered.join(", "))
        };
        let mut e = ApiError::new(422, "Invalid", message);
        e.details.kind = kind.into();
        e.details.name = name.into();
        e.details.causes = causes;
        e
    }
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(500, "InternalError", message)
    }
    pub fn timeout(message: impl Into<String>) -> Self {
        ApiError::new(504, "Timeout", message)
    }
    pub fn too_many_requests(message: impl Into<String>) -> Self {
        let mut e = ApiError::new(429, "TooManyRequests", message);
        e.details.retry_after_seconds = Some(1);
        e
    }

    /// The `metav1.Status` object.
    pub fn to_status(&self) -> Value {
        let d = &self.details;
        let mut details = serde_json::Map::new();
        if !d.name.is_empty() {
            details.insert("name".into(), json!(d.name));
        }
        if !d.group.is_empty() {
            details.insert("group".into(), json!(d.group));
        }
        if !d.kind.is_empty() {
            details.insert("kind".into(), json!(d.kind));
        }
        if !d.causes.is_empty() {
            let causes: Vec<Value> = d
                .causes
                .iter()
                .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
                .collect();
            details.insert("causes".into(), Value::Array(causes));
        }
        if let Some(s) = d.retry_after_seconds {
            details.insert("retryAfterSeconds".into(), json!(s));
        }
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if !details.is_empty() {
            status["details"] = Value::Object(details);
        }
        status
    }
}

/// A `Status` reporting success (as returned by some deletes).
pub fn success(group: &str, kind: &str, name: &str, uid: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": name, "group": group, "kind": kind, "uid": uid},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_carry_reason_code_and_details() {
        let cases = [
            (
                ApiError::not_found("pods", "p"),
                404,
                "NotFound",
                "pods \"p\" not found",
            ),
            (
                ApiError::already_exists("deployments.apps", "d"),
                409,
                "AlreadyExists",
                "deployments.apps \"d\" already exists",
            ),
            (
                ApiError::invalid("Pod", "p", vec![Cause::required("spec.containers")]),
                422,
                "Invalid",
                "Pod \"p\" is invalid: spec.containers: Required value",
            ),
        ];
        for (err, code, reason, message) in cases {
            let s = err.to_status();
            assert_eq!(s["code"], code);
            assert_eq!(s["reason"], reason);
            assert_eq!(s["message"], message);
            assert_eq!(s["kind"], "Status");
            assert_eq!(s["status"], "Failure");
        }
        let s = ApiError::invalid(
            "Pod",
            "p",
            vec![Cause::required("a"), Cause::invalid("b", "x", "bad")],
        )
        .to_status();
        assert_eq!(s["details"]["causes"].as_array().unwrap().len(), 2);
        assert_eq!(s["details"]["causes"][1]["field"], "b");
        assert_eq!(
            s["message"],
            "Pod \"p\" is invalid: [a: Required value, b: Invalid value: \"x\": bad]"
        );
    }
}
