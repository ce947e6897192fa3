//! The observability component (k8s/components/observability) speaks of metrics that exist:
//! the Grafana dashboard is generated from the metric families the code registers
//! (`tessera_mesh::metrics::Metrics`), and every metric a panel or a Prometheus rule names
//! is one the services emit (or Prometheus's own `up`).
//!
//! After changing the metrics, regenerate the dashboard with
//! `TESSERA_REGENERATE=1 cargo test -p tessera-tests --test observability`.
#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;
use serde_json::{Value, json};

fn component() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s/components/observability")
}

/// One metric family as the exposition format describes it.
struct Family {
    name: String,
    kind: String,
    help: String,
}

/// The metrics one workload exposes, with a call recorded so every family has samples.
fn exposition() -> String {
    let metrics = tessera_mesh::metrics::Metrics::new();
    let method: Arc<str> = "/tessera.posts.v1.PostService/GetPost".into();
    let caller: Arc<str> = "gateway".into();
    metrics.record(&method, tonic::Code::Ok, &caller, 0.003);
    metrics.render()
}

fn families(text: &str) -> Vec<Family> {
    let mut out: Vec<Family> = Vec::new();
    for line in text.lines() {
        let mut words = line.splitn(4, ' ');
        match (words.next(), words.next(), words.next(), words.next()) {
            (Some("#"), Some("TYPE"), Some(name), Some(kind)) => out.push(Family {
                name: name.to_owned(),
                kind: kind.to_owned(),
                help: String::new(),
            }),
            (Some("#"), Some("HELP"), Some(name), Some(help)) => {
                if let Some(family) = out.iter_mut().find(|f| f.name == name) {
                    family.help = help.to_owned();
                } else {
                    out.push(Family {
                        name: name.to_owned(),
                        kind: String::new(),
                        help: help.to_owned(),
                    });
                }
            }
            _ => {}
        }
    }
    out
}

/// The series names the exposition carries (`_total`, `_bucket`, `_sum`, `_count`...).
fn emitted(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Metric names in a PromQL expression: identifiers outside label matchers and strings,
/// that are not functions, keywords or label names.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const WORDS: &[&str] = &[
        "sum",
        "by",
        "without",
        "rate",
        "irate",
        "increase",
        "histogram_quantile",
        "or",
        "and",
        "unless",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "max",
        "min",
        "avg",
        "count",
        "topk",
        "bottomk",
        "offset",
        "bool",
        "abs",
        "clamp_min",
        "clamp_max",
        "le",
        "vector",
        "label_replace",
    ];
    let mut names = BTreeSet::new();
    let mut chars = expr.char_indices().peekable();
    let (mut in_braces, mut in_parens_after_by) = (0, false);
    while let Some((i, c)) = chars.next() {
        match c {
            '{' => in_braces += 1,
            '}' => in_braces -= 1,
            '"' | '\'' | '`' => {
                // Skip a string literal.
                for (_, d) in chars.by_ref() {
                    if d == c {
                        break;
                    }
                }
            }
            '[' => {
                for (_, d) in chars.by_ref() {
                    if d == ']' {
                        break;
                    }
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let mut end = i + c.len_utf8();
                while let Some(&(j, d)) = chars.peek() {
                    if d.is_ascii_alphanumeric() || d == '_' || d == ':' {
                        end = j + d.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                let word = &expr[i..end];
                if in_braces > 0 || word.starts_with('$') {
                    continue;
                }
                if in_parens_after_by {
                    continue;
                }
                if word == "by" || word == "without" || word == "on" || word == "ignoring" {
                    // The label list that follows.
                    in_parens_after_by = true;
                    continue;
                }
                if !WORDS.contains(&word) {
                    names.insert(word.to_owned());
                }
            }
            ')' if in_parens_after_by => in_parens_after_by = false,
            _ => {}
        }
    }
    names
}

/// The dashboard for `families`: per family of the request path, the panels an operator
/// reads first (golden signals), variables for namespace and service.
fn dashboard(families: &[Family]) -> Value {
    let selector = r#"namespace="$namespace", service=~"$service""#;
    let mut panels = Vec::new();
    let mut y = 0;
    let mut panel = |title: String, description: &str, unit: &str, targets: Vec<(String, &str)>| {
        let id = panels.len() + 1;
        panels.push(json!({
            "id": id,
            "type": "timeseries",
            "title": title,
            "description": description,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": if id % 2 == 1 { 0 } else { 12 }, "y": y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": targets.iter().enumerate().map(|(i, (expr, legend))| json!({
                "refId": ((b'A' + i as u8) as char).to_string(),
                "expr": expr,
                "legendFormat": legend,
            })).collect::<Vec<_>>(),
        }));
        if id % 2 == 0 {
            y += 8;
        }
    };
    for family in families {
        let name = &family.name;
        match family.kind.as_str() {
            "counter" => {
                let series = format!("{name}_total");
                let rate = |filter: &str| {
                    format!(
                        "sum by (service) (rate({series}{{{selector}{filter}}}[$__rate_interval]))"
                    )
                };
                panel(
                    "Traffic: calls per second".into(),
                    &family.help,
                    "reqps",
                    vec![(rate(""), "{{service}}")],
                );
                panel(
                    "Errors: share of calls failing on the server side".into(),
                    "UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS, UNIMPLEMENTED",
                    "percentunit",
                    vec![(
                        format!(
                            "{} / {}",
                            rate(
                                r#", code=~"UNKNOWN|DEADLINE_EXCEEDED|INTERNAL|UNAVAILABLE|DATA_LOSS|UNIMPLEMENTED""#
                            ),
                            rate("")
                        ),
                        "{{service}}",
                    )],
                );
                panel(
                    "Saturation: share of calls shed (RESOURCE_EXHAUSTED)".into(),
                    "Refused at TESSERA_MAX_CONCURRENCY or by the gateway's rate limits",
                    "percentunit",
                    vec![(
                        format!("{} / {}", rate(r#", code="RESOURCE_EXHAUSTED""#), rate("")),
                        "{{service}}",
                    )],
                );
                panel(
                    "Calls per second by status code".into(),
                    &family.help,
                    "reqps",
                    vec![(
                        format!("sum by (code) (rate({series}{{{selector}}}[$__rate_interval]))"),
                        "{{code}}",
                    )],
                );
            }
            "histogram" => {
                let quantile = |q: &str| {
                    format!(
                        "histogram_quantile({q}, sum by (service, le) (rate({name}_bucket{{{selector}}}[$__rate_interval])))"
                    )
                };
                panel(
                    "Latency: p50 and p99".into(),
                    &family.help,
                    "s",
                    vec![
                        (quantile("0.5"), "p50 {{service}}"),
                        (quantile("0.99"), "p99 {{service}}"),
                    ],
                );
            }
            _ => {}
        }
    }
    panel(
        "Readiness: pods answering on the admin port".into(),
        "Prometheus's up for each scraped pod (PodMonitor tessera)",
        "short",
        vec![(
            format!("sum by (service) (up{{{selector}}})"),
            "{{service}}",
        )],
    );
    json!({
        "title": "Tessera",
        "uid": "tessera-golden-signals",
        "description": "Golden signals of the Tessera services. Generated by tests/tests/observability.rs from the metrics the code emits; do not edit by hand.",
        "tags": ["tessera"],
        "schemaVersion": 39,
        "editable": false,
        "time": {"from": "now-3h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus"},
            {
                "name": "namespace", "type": "query",
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "query": "label_values(up{service=~\"users|posts|comments|notifications|gateway\"}, namespace)",
                "refresh": 2,
            },
            {
                "name": "service", "type": "query", "multi": true, "includeAll": true,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "query": "label_values(up{namespace=\"$namespace\", service=~\"users|posts|comments|notifications|gateway\"}, service)",
                "refresh": 2,
            },
        ]},
        "panels": panels,
    })
}

fn dashboard_path() -> PathBuf {
    component().join("dashboards/tessera.json")
}

#[test]
fn the_dashboard_is_generated_from_the_emitted_metrics() {
    let text = exposition();
    let families = families(&text);
    assert!(
        families.iter().any(|f| f.kind == "counter")
            && families.iter().any(|f| f.kind == "histogram"),
        "{text}"
    );
    let generated = serde_json::to_string_pretty(&dashboard(&families)).unwrap() + "\n";
    if std::env::var_os("TESSERA_REGENERATE").is_some() {
        std::fs::write(dashboard_path(), &generated).unwrap();
    }
    let committed = std::fs::read_to_string(dashboard_path()).unwrap();
    assert!(
        committed == generated,
        "{} is not what the metrics generate; run TESSERA_REGENERATE=1 cargo test -p tessera-tests --test observability",
        dashboard_path().display()
    );
}

/// Problems: names in `exprs` that are neither emitted nor in `also`.
fn unknown_metrics<'a>(
    exprs: impl IntoIterator<Item = (String, &'a str)>,
    emitted: &BTreeSet<String>,
    also: &BTreeSet<String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (what, expr) in exprs {
        for name in metric_names(expr) {
            if !emitted.contains(&name) && !also.contains(&name) {
                problems.push(format!(
                    "{what}: {name} is not a metric the services emit ({expr})"
                ));
            }
        }
    }
    problems
}

#[test]
fn every_panel_and_rule_names_a_metric_that_exists() {
    let emitted = emitted(&exposition());
    assert!(
        emitted.contains("tessera_grpc_server_requests_total"),
        "{emitted:?}"
    );
    let prometheus_own: BTreeSet<String> = ["up".to_owned()].into();

    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(dashboard_path()).unwrap()).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push((
                format!("panel {:?}", panel["title"].as_str().unwrap_or_default()),
                target["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    assert!(exprs.len() >= 6, "{exprs:?}");
    let problems = unknown_metrics(
        exprs.iter().map(|(w, e)| (w.clone(), e.as_str())),
        &emitted,
        &prometheus_own,
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The rules: recorded series may be used by later rules.
    let text = std::fs::read_to_string(component().join("prometheusrule.yaml")).unwrap();
    let rule: serde_norway::Value =
        serde_norway::Value::deserialize(serde_norway::Deserializer::from_str(&text)).unwrap();
    let mut known = prometheus_own.clone();
    let mut rule_exprs = Vec::new();
    for group in rule["spec"]["groups"].as_sequence().unwrap() {
        for r in group["rules"].as_sequence().unwrap() {
            let name = r["record"]
                .as_str()
                .or(r["alert"].as_str())
                .unwrap()
                .to_owned();
            if let Some(record) = r["record"].as_str() {
                known.insert(record.to_owned());
            }
            rule_exprs.push((
                format!("rule {name}"),
                r["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    assert!(rule_exprs.len() >= 8);
    let problems = unknown_metrics(
        rule_exprs.iter().map(|(w, e)| (w.clone(), e.as_str())),
        &emitted,
        &known,
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_check_catches_a_metric_that_does_not_exist() {
    let emitted = emitted(&exposition());
    let expr = r#"sum by (service, code) (rate(tessera_grpc_server_calls_total{code="OK"}[5m])) / on (service) up"#;
    assert_eq!(
        metric_names(expr),
        [
            "tessera_grpc_server_calls_total".to_owned(),
            "up".to_owned()
        ]
        .into()
    );
    let problems = unknown_metrics([("panel".to_owned(), expr)], &emitted, &BTreeSet::new());
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("tessera_grpc_server_calls_total"));
}
