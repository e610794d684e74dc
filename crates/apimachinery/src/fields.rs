//! Field selectors: `metadata.name=x,spec.nodeName!=`, matched against fields a kind exposes.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRequirement {
    pub field: String,
    pub value: String,
    pub negate: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    pub requirements: Vec<FieldRequirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("invalid selector: '{0}'; can't understand '{0}'")]
    Syntax(String),
    #[error("field label not supported: {0}")]
    Unsupported(String),
}

impl FieldSelector {
    pub fn parse(input: &str) -> Result<FieldSelector, FieldError> {
        let mut requirements = Vec::new();
        for part in split_unescaped(input) {
            if part.is_empty() {
                continue;
            }
            let (field, value, negate) = if let Some(i) = part.find("!=") {
                (&part[..i], &part[i + 2..], true)
            } else if let Some(i) = part.find("==") {
                (&part[..i], &part[i + 2..], false)
            } else if let Some(i) = part.find('=') {
                (&part[..i], &part[i + 1..], false)
            } else {
                return Err(FieldError::Syntax(part));
            };
            let field = field.trim();
            if field.is_empty() {
                return Err(FieldError::Syntax(part.clone()));
            }
            requirements.push(FieldRequirement {
                field: field.to_string(),
                value: unescape(value.trim()),
                negate,
            });
        }
        Ok(FieldSelector { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Check every field is one the kind supports.
    pub fn check_supported(&self, supported: impl Fn(&str) -> bool) -> Result<(), FieldError> {
        for r in &self.requirements {
            if !supported(&r.field) {
                return Err(FieldError::Unsupported(r.field.clone()));
            }
        }
        Ok(())
    }

    /// `get` returns the object's value for a field (missing fields read as "").
    pub fn matches(&self, get: impl Fn(&str) -> Option<String>) -> bool {
        self.requirements.iter().all(|r| {
            let v = get(&r.field).unwrap_or_default();
            (v == r.value) != r.negate
        })
    }

    /// The value required by an exact `field=value` term, if any (used for cheap pre-filtering).
    pub fn exact(&self, field: &str) -> Option<&str> {
        self.requirements
            .iter()
            .find(|r| r.field == field && !r.negate)
            .map(|r| r.value.as_str())
    }
}

fn split_unescaped(input: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut escaped = false;
    for c in input.chars() {
        if escaped {
            cur.push('\\');
            cur.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == ',' {
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

fn unescape(v: &str) -> String {
    let mut out = String::new();
    let mut escaped = false;
    for c in v.chars() {
        if escaped {
            out.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_matches() {
        let get = |f: &str| match f {
            "metadata.name" => Some("p1".to_string()),
            "spec.nodeName" => Some(String::new()),
            "status.phase" => Some("Running".to_string()),
            _ => None,
        };
        for (sel, want) in [
            ("metadata.name=p1", true),
            ("metadata.name==p1", true),
            ("metadata.name!=p1", false),
            ("spec.nodeName=", true),
            ("spec.nodeName!=", false),
            ("status.phase=Running,metadata.name=p1", true),
            ("status.phase=Pending,metadata.name=p1", false),
            ("", true),
        ] {
            assert_eq!(
                FieldSelector::parse(sel).unwrap().matches(get),
                want,
                "{sel}"
            );
        }
        assert!(FieldSelector::parse("nonsense").is_err());
        let s = FieldSelector::parse("spec.foo=1").unwrap();
        assert!(s.check_supported(|f| f == "metadata.name").is_err());
        assert_eq!(
            FieldSelector::parse("a=x\\,y").unwrap().requirements[0].value,
            "x,y"
        );
    }
}
