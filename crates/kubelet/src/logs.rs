//! Container logs as CRI writes them (`<RFC3339Nano time> <stdout|stderr> <P|F> <text>`), read
//! back as `kubectl logs` wants them: partial lines joined, `tailLines`, `sinceSeconds` /
//! `sinceTime`, `timestamps`, `limitBytes`, and `follow`.

use chrono::{DateTime, Utc};

/// One whole log line.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub time: String,
    pub text: String,
}

/// What the caller asked for (`pods/log` query parameters).
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub follow: bool,
    pub tail_lines: Option<usize>,
    pub since: Option<DateTime<Utc>>,
    pub timestamps: bool,
    pub limit_bytes: Option<usize>,
    pub previous: bool,
}

impl Query {
    pub fn parse(query: &str) -> Result<Query, String> {
        let mut q = Query::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let num = |v: &str| {
                v.parse::<i64>()
                    .map_err(|_| format!("{k}: {v:?} is not a number"))
            };
            match k.as_ref() {
                "follow" => q.follow = v == "true",
                "previous" => q.previous = v == "true",
                "timestamps" => q.timestamps = v == "true",
                "tailLines" => q.tail_lines = Some(num(&v)?.max(0) as usize),
                "limitBytes" => q.limit_bytes = Some(num(&v)?.max(1) as usize),
                "sinceSeconds" => {
                    q.since = Some(Utc::now() - chrono::Duration::seconds(num(&v)?.max(0)))
                }
                "sinceTime" => {
                    q.since = Some(
                        DateTime::parse_from_rfc3339(&v)
                            .map_err(|e| format!("sinceTime: {e}"))?
                            .with_timezone(&Utc),
                    )
                }
                _ => {}
            }
        }
        Ok(q)
    }

    fn wants(&self, l: &Line) -> bool {
        match self.since {
            None => true,
            Some(s) => DateTime::parse_from_rfc3339(&l.time).is_ok_and(|t| t >= s),
        }
    }

    pub fn render(&self, l: &Line) -> String {
        if self.timestamps {
            format!("{} {}", l.time, l.text)
        } else {
            l.text.clone()
        }
    }
}

/// Parses CRI log bytes into whole lines; returns them and how many bytes were consumed (an
/// unfinished last line stays for the next read).
pub fn parse(data: &[u8], partial: &mut String) -> (Vec<Line>, usize) {
    let mut out = Vec::new();
    let mut used = 0;
    while let Some(nl) = data[used..].iter().position(|b| *b == b'\n') {
        let raw = String::from_utf8_lossy(&data[used..used + nl]).into_owned();
        used += nl + 1;
        let mut parts = raw.splitn(4, ' ');
        let (Some(time), Some(_stream), Some(tag)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let text = parts.next().unwrap_or("");
        partial.push_str(text);
        if tag == "P" {
            continue;
        }
        out.push(Line {
            time: time.to_string(),
            text: format!("{}\n", std::mem::take(partial)),
        });
    }
    (out, used)
}

/// The lines of a whole log, as the query selects them (before `follow`).
pub fn select(q: &Query, lines: Vec<Line>) -> Vec<Line> {
    let mut lines: Vec<Line> = lines.into_iter().filter(|l| q.wants(l)).collect();
    if let Some(n) = q.tail_lines {
        let skip = lines.len().saturating_sub(n);
        lines.drain(..skip);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, query: &str, expect: &str) {
        let mut partial = String::new();
        let (lines, _) = parse(input.as_bytes(), &mut partial);
        let q = Query::parse(query).unwrap();
        let out: String = select(&q, lines).iter().map(|l| q.render(l)).collect();
        assert_eq!(out, expect, "query {query:?}");
    }

    const LOG: &str = "2026-01-01T00:00:01.000000001Z stdout F one\n\
                       2026-01-01T00:00:02.5Z stderr P tw\n\
                       2026-01-01T00:00:02.6Z stderr F o\n\
                       2026-01-01T00:00:03Z stdout F three\n\
                       2026-01-01T00:00:04Z stdout F";

    #[test]
    fn lines_and_queries() {
        check(LOG, "", "one\ntwo\nthree\n");
        check(LOG, "tailLines=2", "two\nthree\n");
        check(LOG, "tailLines=0", "");
        check(
            LOG,
            "timestamps=true&tailLines=1",
            "2026-01-01T00:00:03Z three\n",
        );
        check(LOG, "sinceTime=2026-01-01T00:00:02.6Z", "two\nthree\n");
    }

    #[test]
    fn unfinished_lines_wait() {
        let mut partial = String::new();
        let (lines, used) = parse(LOG.as_bytes(), &mut partial);
        assert_eq!(lines.len(), 3);
        assert_eq!(&LOG[used..], "2026-01-01T00:00:04Z stdout F");
    }

    #[test]
    fn bad_numbers_are_errors() {
        assert!(Query::parse("tailLines=x").is_err());
        assert!(Query::parse("sinceTime=yesterday").is_err());
    }
}
