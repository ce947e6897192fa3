//! `google.api.http` path templates: parsing (`/v1/posts/{post.post_id}`, `/v1/users:batchGet`,
//! `/v1/{name=shelves/*}`) and matching a request path against one, capturing its variables.

/// One segment of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: exactly one segment.
    One,
    /// `**`: the rest of the path (last segment only).
    Rest,
}

/// A variable: the request field it fills and the segments it covers.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Variable {
    field_path: Vec<String>,
    start: usize,
    /// One past the last segment; for a variable ending in `**`, that is the end of the path.
    end: usize,
}

/// A parsed path template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    segments: Vec<Segment>,
    variables: Vec<Variable>,
    verb: Option<String>,
    source: String,
}

/// Why a template could not be parsed (a contract defect, reported at start-up).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("path template {template:?}: {reason}")]
pub struct TemplateError {
    template: String,
    reason: &'static str,
}

impl Template {
    /// Parses a `google.api.http` path; an error names what is unsupported or malformed.
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        let err = |reason| TemplateError {
            template: source.to_owned(),
            reason,
        };
        let rest = source.strip_prefix('/').ok_or(err("must start with '/'"))?;
        // The verb is a ':' after the last '/' and outside any variable.
        let tail_start = rest.rfind(['/', '}']).map_or(0, |i| i + 1);
        let (body, verb) = match rest[tail_start..].find(':') {
            Some(i) => {
                let at = tail_start + i;
                (&rest[..at], Some(rest[at + 1..].to_owned()))
            }
            None => (rest, None),
        };
        if verb.as_deref() == Some("") {
            return Err(err("empty verb"));
        }
        let mut segments = Vec::new();
        let mut variables = Vec::new();
        let mut chars = body;
        while !chars.is_empty() {
            if let Some(inner) = chars.strip_prefix('{') {
                let close = inner.find('}').ok_or(err("unclosed '{'"))?;
                let (name, pattern) = match inner[..close].split_once('=') {
                    Some((name, pattern)) => (name, pattern),
                    None => (&inner[..close], "*"),
                };
                let field_path: Vec<String> = name.split('.').map(str::to_owned).collect();
                if field_path.iter().any(|p| !is_ident(p)) {
                    return Err(err("a variable must name a field path"));
                }
                let start = segments.len();
                for part in pattern.split('/') {
                    segments.push(literal_or_wildcard(part).ok_or(err("bad variable pattern"))?);
                }
                variables.push(Variable {
                    field_path,
                    start,
                    end: segments.len(),
                });
                chars = &inner[close + 1..];
            } else {
                let end = chars.find('/').unwrap_or(chars.len());
                segments.push(literal_or_wildcard(&chars[..end]).ok_or(err("bad segment"))?);
                chars = &chars[end..];
            }
            chars = match chars.strip_prefix('/') {
                Some("") => return Err(err("trailing '/'")),
                Some(more) => more,
                None if chars.is_empty() => chars,
                None => return Err(err("a variable must be a whole segment")),
            };
        }
        if segments.is_empty() {
            return Err(err("no segments"));
        }
        if let Some(i) = segments.iter().position(|s| *s == Segment::Rest)
            && i + 1 != segments.len()
        {
            return Err(err("'**' must be the last segment"));
        }
        Ok(Self {
            segments,
            variables,
            verb,
            source: source.to_owned(),
        })
    }

    /// The template as written in the contract.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The field paths of the variables, in order (`["post", "post_id"]`).
    pub fn variables(&self) -> impl Iterator<Item = &[String]> {
        self.variables.iter().map(|v| v.field_path.as_slice())
    }

    /// The template in OpenAPI form: `/v1/posts/{post.post_id}`, patterns dropped.
    pub fn openapi_path(&self) -> String {
        let mut out = String::new();
        let mut i = 0;
        while i < self.segments.len() {
            out.push('/');
            if let Some(v) = self.variables.iter().find(|v| v.start == i) {
                out.push('{');
                out.push_str(&v.field_path.join("."));
                out.push('}');
                i = v.end.max(i + 1);
                continue;
            }
            match &self.segments[i] {
                Segment::Literal(l) => out.push_str(l),
                Segment::One => out.push('*'),
                Segment::Rest => out.push_str("**"),
            }
            i += 1;
        }
        if let Some(verb) = &self.verb {
            out.push(':');
            out.push_str(verb);
        }
        out
    }

    /// Matches a request path (as sent, percent-encoded) and returns each variable's field path
    /// and decoded value; `None` when the path does not fit.
    pub fn matches(&self, path: &str) -> Option<Vec<(Vec<String>, String)>> {
        let mut path = path.strip_prefix('/')?;
        if let Some(verb) = &self.verb {
            path = path.strip_suffix(verb.as_str())?.strip_suffix(':')?;
        }
        let parts: Vec<&str> = path.split('/').collect();
        let rest = self.segments.last() == Some(&Segment::Rest);
        let fixed = self.segments.len() - usize::from(rest);
        if parts.len() < fixed || (!rest && parts.len() != fixed) {
            return None;
        }
        for (segment, part) in self.segments.iter().zip(&parts) {
            match segment {
                Segment::Literal(l) if l != part => return None,
                Segment::One if part.is_empty() => return None,
                _ => {}
            }
        }
        let mut out = Vec::with_capacity(self.variables.len());
        for v in &self.variables {
            let end = if v.end == self.segments.len() && rest {
                parts.len()
            } else {
                v.end
            };
            let raw = parts.get(v.start..end)?.join("/");
            out.push((v.field_path.clone(), percent_decode(&raw)?));
        }
        Some(out)
    }
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn literal_or_wildcard(part: &str) -> Option<Segment> {
    match part {
        "" => None,
        "*" => Some(Segment::One),
        "**" => Some(Segment::Rest),
        l if l.contains(['{', '}', '*', ':']) => None,
        l => Some(Segment::Literal(l.to_owned())),
    }
}

/// Decodes `%XX` escapes (and nothing else: `+` is a plus sign in a path). `None` for a
/// malformed escape or bytes that are not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn vars(t: &str, path: &str) -> Option<Vec<(String, String)>> {
        Template::parse(t).unwrap().matches(path).map(|v| {
            v.into_iter()
                .map(|(field, value)| (field.join("."), value))
                .collect()
        })
    }

    #[test]
    fn literals_variables_and_nested_fields() {
        assert_eq!(vars("/v1/posts", "/v1/posts"), Some(vec![]));
        assert_eq!(vars("/v1/posts", "/v1/posts/x"), None);
        assert_eq!(
            vars("/v1/posts/{post_id}/comments", "/v1/posts/p%2D1/comments"),
            Some(vec![("post_id".into(), "p-1".into())])
        );
        assert_eq!(vars("/v1/posts/{post_id}", "/v1/posts/"), None);
        assert_eq!(
            vars("/v1/posts/{post.post_id}", "/v1/posts/abc"),
            Some(vec![("post.post_id".into(), "abc".into())])
        );
        assert_eq!(
            vars("/v1/{name=shelves/*/books/**}", "/v1/shelves/1/books/a/b"),
            Some(vec![("name".into(), "shelves/1/books/a/b".into())])
        );
        assert_eq!(vars("/v1/posts/{post_id}", "/v1/posts/%zz"), None);
    }

    #[test]
    fn verbs() {
        assert_eq!(
            vars("/v1/users:batchGet", "/v1/users:batchGet"),
            Some(vec![])
        );
        assert_eq!(vars("/v1/users:batchGet", "/v1/users"), None);
        assert_eq!(vars("/v1/users/{user_id}", "/v1/users:batchGet"), None);
        assert_eq!(
            vars("/v1/users/{user_id}:setRole", "/v1/users/u1:setRole"),
            Some(vec![("user_id".into(), "u1".into())])
        );
        let t = Template::parse("/v1/users/{user_id}:setRole").unwrap();
        assert_eq!(t.openapi_path(), "/v1/users/{user_id}:setRole");
    }

    #[test]
    fn malformed_templates_are_errors() {
        for bad in [
            "v1/posts",
            "/v1/{post_id",
            "/v1/{1x}",
            "/v1/**/x",
            "/v1/",
            "/v1/a{b}",
            "/v1/x:",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }
}
