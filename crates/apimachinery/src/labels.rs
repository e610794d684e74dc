//! Label selectors: the string form (`a=b,c!=d,e in (f,g),!h`) and `matchLabels`/`matchExpressions`.

use std::collections::BTreeMap;

use crate::validation;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Equals,
    NotEquals,
    In,
    NotIn,
    Exists,
    DoesNotExist,
    Gt,
    Lt,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
    pub values: Vec<String>,
}

/// A parsed selector: all requirements must hold. The empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unable to parse requirement: {0}")]
pub struct ParseError(pub String);

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Parse the string form used in `?labelSelector=`.
    pub fn parse(input: &str) -> Result<Selector, ParseError> {
        let mut requirements = Vec::new();
        for part in split_top_level(input)? {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            requirements.push(parse_requirement(part)?);
        }
        Ok(Selector { requirements })
    }

    /// Build from a `LabelSelector` object (`matchLabels`, `matchExpressions`).
    pub fn from_label_selector(v: &serde_json::Value) -> Result<Selector, ParseError> {
        let mut requirements = Vec::new();
        if let Some(m) = v.get("matchLabels").and_then(|m| m.as_object()) {
            for (k, val) in m {
                requirements.push(Requirement {
                    key: k.clone(),
                    op: Op::Equals,
                    values: vec![val.as_str().unwrap_or_default().to_string()],
                });
            }
        }
        if let Some(exprs) = v.get("matchExpressions").and_then(|m| m.as_array()) {
            for e in exprs {
                let key = e["key"].as_str().unwrap_or_default().to_string();
                let values: Vec<String> = e["values"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                let op = match e["operator"].as_str().unwrap_or_default() {
                    "In" => Op::In,
                    "NotIn" => Op::NotIn,
                    "Exists" => Op::Exists,
                    "DoesNotExist" => Op::DoesNotExist,
                    other => {
                        return Err(ParseError(format!(
                            "{other:?} is not a valid label selector operator"
                        )))
                    }
                };
                requirements.push(Requirement { key, op, values });
            }
        }
        Ok(Selector { requirements })
    }
}

impl Requirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let v = labels.get(&self.key);
        match self.op {
            Op::Equals | Op::In => v.is_some_and(|v| self.values.iter().any(|x| x == v)),
            Op::NotEquals | Op::NotIn => v.is_none_or(|v| !self.values.iter().any(|x| x == v)),
            Op::Exists => v.is_some(),
            Op::DoesNotExist => v.is_none(),
            Op::Gt | Op::Lt => {
                let (Some(v), Some(bound)) = (
                    v.and_then(|v| v.parse::<i64>().ok()),
                    self.values.first().and_then(|b| b.parse::<i64>().ok()),
                ) else {
                    return false;
                };
                if self.op == Op::Gt {
                    v > bound
                } else {
                    v < bound
                }
            }
        }
    }
}

fn split_top_level(input: &str) -> Result<Vec<&str>, ParseError> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in input.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(ParseError(format!("unbalanced ')' in {input:?}")));
                }
            }
            ',' if depth == 0 => {
                parts.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(ParseError(format!("unclosed '(' in {input:?}")));
    }
    parts.push(&input[start..]);
    Ok(parts)
}

fn check_key(key: &str) -> Result<(), ParseError> {
    let errs = validation::qualified_name(key);
    if let Some(e) = errs.first() {
        return Err(ParseError(format!("invalid label key \"{key}\": {e}")));
    }
    Ok(())
}

fn check_value(v: &str) -> Result<(), ParseError> {
    let errs = validation::label_value(v);
    if let Some(e) = errs.first() {
        return Err(ParseError(format!("invalid label value: \"{v}\": {e}")));
    }
    Ok(())
}

fn parse_requirement(part: &str) -> Result<Requirement, ParseError> {
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        check_key(key)?;
        return Ok(Requirement {
            key: key.into(),
            op: Op::DoesNotExist,
            values: vec![],
        });
    }
    for (tok, op) in [
        ("!=", Op::NotEquals),
        ("==", Op::Equals),
        ("=", Op::Equals),
        (">", Op::Gt),
        ("<", Op::Lt),
    ] {
        if let Some(idx) = part.find(tok) {
            let key = part[..idx].trim();
            let value = part[idx + tok.len()..].trim();
            check_key(key)?;
            if matches!(op, Op::Gt | Op::Lt) {
                value.parse::<i64>().map_err(|_| {
                    ParseError(format!(
                        "for 'Gt', 'Lt' operators, the value must be an integer: {part:?}"
                    ))
                })?;
            } else {
                check_value(value)?;
            }
            return Ok(Requirement {
                key: key.into(),
                op,
                values: vec![value.into()],
            });
        }
    }
    let words: Vec<&str> = part.splitn(2, char::is_whitespace).collect();
    if words.len() == 2 {
        let key = words[0].trim();
        let rest = words[1].trim();
        let (op, list) = if let Some(l) = rest.strip_prefix("notin") {
            (Op::NotIn, l)
        } else if let Some(l) = rest.strip_prefix("in") {
            (Op::In, l)
        } else {
            return Err(ParseError(format!(
                "found '{rest}', expected: in, notin, =, ==, !=, gt, lt"
            )));
        };
        let list = list.trim();
        let inner = list
            .strip_prefix('(')
            .and_then(|l| l.strip_suffix(')'))
            .ok_or_else(|| {
                ParseError(format!(
                    "expected a parenthesised set of values in {part:?}"
                ))
            })?;
        check_key(key)?;
        let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
        for v in &values {
            check_value(v)?;
        }
        return Ok(Requirement {
            key: key.into(),
            op,
            values,
        });
    }
    check_key(part)?;
    Ok(Requirement {
        key: part.into(),
        op: Op::Exists,
        values: vec![],
    })
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
    fn selectors_match_as_upstream() {
        let l = labels(&[("app", "web"), ("tier", "front"), ("n", "5")]);
        for (sel, want) in [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app!=db", true),
            ("missing!=x", true),
            ("app in (web,db)", true),
            ("app in (db)", false),
            ("app notin (db, cache)", true),
            ("missing notin (db)", true),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("app=web,tier=front", true),
            ("app=web,tier=back", false),
            ("app in (web),!missing,tier", true),
            ("n>4", true),
            ("n<4", false),
            ("example.com/key=x", false),
        ] {
            let s = Selector::parse(sel).unwrap_or_else(|e| panic!("{sel}: {e}"));
            assert_eq!(s.matches(&l), want, "{sel}");
        }
    }

    #[test]
    fn bad_selectors_are_errors() {
        for sel in [
            "app in web",
            "app in (web",
            "a b c",
            "=x",
            "app=-bad-",
            "n>x",
            "bad key=1",
        ] {
            assert!(Selector::parse(sel).is_err(), "{sel} should not parse");
        }
    }

    #[test]
    fn label_selector_objects() {
        let v = serde_json::json!({"matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["front"]}]});
        let s = Selector::from_label_selector(&v).unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        let bad = serde_json::json!({"matchExpressions": [{"key": "a", "operator": "Near"}]});
        assert!(Selector::from_label_selector(&bad).is_err());
    }
}
