//! Label and field selectors, parsed the way kube-apiserver reads them.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    /// Also matches objects without the key, as in Kubernetes.
    NotIn(String, Vec<String>),
}

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LabelSelector(Vec<Requirement>);

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
        && !k.starts_with('/')
        && !k.ends_with('/')
}

fn valid_value(v: &str) -> bool {
    v.chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// Splits on commas outside parentheses, so `k in (a,b)` stays whole.
fn split_terms(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn parse_set(key: &str, rest: &str, negate: bool) -> Result<Requirement, String> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesised set after {key:?}"))?;
    let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
    if !valid_key(key) || !values.iter().all(|v| valid_value(v)) {
        return Err(format!("invalid set requirement for key {key:?}"));
    }
    Ok(if negate {
        Requirement::NotIn(key.into(), values)
    } else {
        Requirement::In(key.into(), values)
    })
}

fn parse_term(t: &str) -> Result<Requirement, String> {
    if let Some(k) = t.strip_prefix('!') {
        let k = k.trim();
        return valid_key(k)
            .then(|| Requirement::NotExists(k.into()))
            .ok_or_else(|| format!("invalid label key {k:?}"));
    }
    if let Some((lhs, _)) = t.split_once('(') {
        let mut words = lhs.split_whitespace();
        if let (Some(key), Some(op), None) = (words.next(), words.next(), words.next()) {
            let rest = &t[lhs.len()..];
            match op {
                "in" => return parse_set(key, rest, false),
                "notin" => return parse_set(key, rest, true),
                _ => {}
            }
        }
        return Err(format!("unable to parse requirement {t:?}"));
    }
    let (key, value, negate) = if let Some((k, v)) = t.split_once("!=") {
        (k, Some(v), true)
    } else if let Some((k, v)) = t.split_once("==") {
        (k, Some(v), false)
    } else if let Some((k, v)) = t.split_once('=') {
        (k, Some(v), false)
    } else {
        (t, None, false)
    };
    let key = key.trim();
    if !valid_key(key) {
        return Err(format!("invalid label key {key:?}"));
    }
    match value.map(str::trim) {
        None => Ok(Requirement::Exists(key.into())),
        Some(v) if !valid_value(v) => Err(format!("invalid label value {v:?}")),
        Some(v) if negate => Ok(Requirement::NotIn(key.into(), vec![v.into()])),
        Some(v) => Ok(Requirement::In(key.into(), vec![v.into()])),
    }
}

impl LabelSelector {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for t in split_terms(s) {
            let t = t.trim();
            if !t.is_empty() {
                reqs.push(parse_term(t)?);
            }
        }
        Ok(Self(reqs))
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
            Requirement::In(k, vs) => get(k).is_some_and(|v| vs.iter().any(|x| x == v)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|v| vs.iter().all(|x| x != v)),
        })
    }
}

/// A parsed `fieldSelector`; only the fields every resource supports.
#[derive(Debug, Clone, Default)]
pub(crate) struct FieldSelector(Vec<(&'static str, String, bool)>);

impl FieldSelector {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, value, eq) = if let Some((f, v)) = t.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                (f, v, true)
            } else {
                return Err(format!("invalid field selector term {t:?}"));
            };
            let pointer = match field.trim() {
                "metadata.name" => "/metadata/name",
                "metadata.namespace" => "/metadata/namespace",
                other => return Err(format!("field label not supported: {other}")),
            };
            reqs.push((pointer, value.trim().to_string(), eq));
        }
        Ok(Self(reqs))
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(ptr, want, eq)| {
            let have = obj.pointer(ptr).and_then(Value::as_str).unwrap_or("");
            (have == want) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kube_proxy_selector() {
        let s = LabelSelector::parse(
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless",
        )
        .unwrap();
        assert!(s.matches(&json!({"metadata": {"labels": {"app": "x"}}})));
        assert!(s.matches(&json!({"metadata": {}})));
        assert!(
            !s.matches(&json!({"metadata": {"labels": {"service.kubernetes.io/headless": ""}}}))
        );
    }

    #[test]
    fn equality_sets_and_errors() {
        let o = json!({"metadata": {"labels": {"a": "1", "b": "2"}}});
        for (sel, want) in [
            ("a=1", true),
            ("a==1,b", true),
            ("a!=1", false),
            ("c!=1", true),
            ("a in (1, 3),b notin (3)", true),
            ("b notin (2)", false),
            ("a,!c", true),
            ("", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&o),
                want,
                "{sel}"
            );
        }
        for bad in ["a=b=c", "!", "a in 1", "a=(x"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad}");
        }
        let f = FieldSelector::parse("metadata.name=x,metadata.namespace!=kube-system").unwrap();
        assert!(f.matches(&json!({"metadata": {"name": "x", "namespace": "default"}})));
        assert!(FieldSelector::parse("spec.nodeName=x").is_err());
    }
}
