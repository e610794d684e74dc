//! Name, label and annotation validation with upstream's rules and messages.

const DNS1123_LABEL_MAX: usize = 63;
const DNS1123_SUBDOMAIN_MAX: usize = 253;
const QUALIFIED_NAME_MAX: usize = 63;
const LABEL_VALUE_MAX: usize = 63;
/// Upstream's limit on the total size of all annotations.
pub const TOTAL_ANNOTATION_SIZE_LIMIT: usize = 256 * 1024;

fn is_alnum_lower(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// A DNS-1123 label: lower-case alphanumerics and '-', starting and ending alphanumeric, ≤ 63.
pub fn dns1123_label(v: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if v.len() > DNS1123_LABEL_MAX {
        errs.push(format!(
            "must be no more than {DNS1123_LABEL_MAX} characters"
        ));
    }
    let ok = !v.is_empty()
        && v.chars().all(|c| is_alnum_lower(c) || c == '-')
        && v.starts_with(is_alnum_lower)
        && v.ends_with(is_alnum_lower);
    if !ok {
        errs.push("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')".to_string());
    }
    errs
}

/// A DNS-1123 subdomain: dot-separated labels, ≤ 253.
pub fn dns1123_subdomain(v: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if v.len() > DNS1123_SUBDOMAIN_MAX {
        errs.push(format!(
            "must be no more than {DNS1123_SUBDOMAIN_MAX} characters"
        ));
    }
    let ok = !v.is_empty()
        && v.split('.').all(|l| {
            !l.is_empty()
                && l.chars().all(|c| is_alnum_lower(c) || c == '-')
                && l.starts_with(is_alnum_lower)
                && l.ends_with(is_alnum_lower)
        });
    if !ok {
        errs.push("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')".to_string());
    }
    errs
}

fn is_name_part(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= QUALIFIED_NAME_MAX
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && v.starts_with(|c: char| c.is_ascii_alphanumeric())
        && v.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// A qualified name (label and annotation keys): `[prefix/]name`.
pub fn qualified_name(v: &str) -> Vec<String> {
    let mut errs = Vec::new();
    let (prefix, name) = match v.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, v),
    };
    if let Some(p) = prefix {
        if p.is_empty() {
            errs.push("prefix part must be non-empty".to_string());
        } else {
            for e in dns1123_subdomain(p) {
                errs.push(format!("prefix part {e}"));
            }
        }
    }
    if name.contains('/') || !is_name_part(name) {
        errs.push("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')".to_string());
    }
    errs
}

/// A label value: empty, or ≤ 63 of alphanumerics, '-', '_', '.', starting and ending alphanumeric.
pub fn label_value(v: &str) -> Vec<String> {
    if v.is_empty() {
        return vec![];
    }
    let mut errs = Vec::new();
    if v.len() > LABEL_VALUE_MAX {
        errs.push(format!("must be no more than {LABEL_VALUE_MAX} characters"));
    }
    let ok = v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && v.starts_with(|c: char| c.is_ascii_alphanumeric())
        && v.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !ok {
        errs.push("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')".to_string());
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for (v, ok) in [
            ("web", true),
            ("web-1", true),
            ("a.b", false),
            ("-a", false),
            ("A", false),
            ("", false),
        ] {
            assert_eq!(dns1123_label(v).is_empty(), ok, "label {v}");
        }
        for (v, ok) in [
            ("a.b.c", true),
            ("a..b", false),
            ("kube-system", true),
            ("x".repeat(254).as_str(), false),
        ] {
            assert_eq!(dns1123_subdomain(v).is_empty(), ok, "subdomain {v}");
        }
        for (v, ok) in [
            ("app", true),
            ("k8s.io/app", true),
            ("/app", false),
            ("a/b/c", false),
            ("App_1.x", true),
            ("-x", false),
        ] {
            assert_eq!(qualified_name(v).is_empty(), ok, "qualified {v}");
        }
        for (v, ok) in [
            ("", true),
            ("v1.2", true),
            ("-v", false),
            ("a b", false),
            ("x".repeat(64).as_str(), false),
        ] {
            assert_eq!(label_value(v).is_empty(), ok, "value {v}");
        }
    }
}
