//! Shared helpers of the API system tests: start the service in-process, and check every
//! answer against `openapi.yaml` (documented status, required JSON fields).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use hyper::{Method, StatusCode};
use kscope::lb::client::{ApiClient, RawResponse};
use kscope::server::{self, Limits, ServeOptions, Server};
use serde_json::Value;
use serde_yaml::Value as Yaml;

pub fn kvm_available() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("SKIPPED: /dev/kvm is absent, VMs cannot be booted on this machine");
    false
}

pub fn temp_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "kscope-api-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub async fn start(limits: Limits, tweak: impl FnOnce(&mut ServeOptions)) -> (Server, ApiClient) {
    let mut o = ServeOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: Some(temp_dir()),
        limits,
        default_mem: 64 << 20,
        ..ServeOptions::default()
    };
    tweak(&mut o);
    let s = server::start(o).await.expect("start the service");
    let c = ApiClient::new(&format!("http://{}", s.addr()), Some(s.token().to_string()));
    (s, c)
}

// ---------- the spec ----------

pub struct Spec {
    doc: Yaml,
}

pub fn spec() -> Spec {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml"))
        .expect("read openapi.yaml");
    Spec {
        doc: serde_yaml::from_str(&text).expect("openapi.yaml is valid YAML"),
    }
}

impl Spec {
    pub fn paths(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut out = BTreeMap::new();
        for (p, item) in self.doc["paths"].as_mapping().expect("paths") {
            let methods = item
                .as_mapping()
                .unwrap()
                .keys()
                .filter_map(|k| k.as_str())
                .filter(|k| ["get", "post", "put", "delete", "patch"].contains(k))
                .map(|k| k.to_uppercase())
                .collect();
            out.insert(p.as_str().unwrap().to_string(), methods);
        }
        out
    }

    pub fn resolve<'a>(&'a self, v: &'a Yaml) -> &'a Yaml {
        match v.get("$ref").and_then(|r| r.as_str()) {
            Some(r) => {
                let mut cur = &self.doc;
                for part in r.trim_start_matches("#/").split('/') {
                    cur = &cur[part];
                }
                self.resolve(cur)
            }
            None => v,
        }
    }

    /// Check that `v` conforms to `schema`, recursively: types, required fields, no
    /// undocumented fields, enums, bounds, string patterns, nullability,
    /// `oneOf`/`anyOf`/`allOf`. Panics with the mismatch.
    pub fn check_schema(&self, schema: &Yaml, v: &Value, at: &str) {
        if let Err(e) = self.conforms(schema, v, at) {
            panic!("{e}");
        }
    }

    /// [`Spec::check_schema`] as a result.
    pub fn conforms(&self, schema: &Yaml, v: &Value, at: &str) -> Result<(), String> {
        let schema = self.resolve(schema);
        if v.is_null() {
            return match schema.get("nullable").and_then(|n| n.as_bool()) {
                Some(true) => Ok(()),
                _ => Err(format!("{at}: null but not nullable")),
            };
        }
        if let Some(all) = schema.get("allOf").and_then(|a| a.as_sequence()) {
            for s in all {
                self.conforms(s, v, at)?;
            }
        }
        for (key, exactly_one) in [("oneOf", true), ("anyOf", false)] {
            if let Some(alts) = schema.get(key).and_then(|a| a.as_sequence()) {
                let ok = alts
                    .iter()
                    .filter(|s| self.conforms(s, v, at).is_ok())
                    .count();
                if ok == 0 || (exactly_one && ok > 1) {
                    return Err(format!("{at}: {v} matches {ok} of the {key} alternatives"));
                }
            }
        }
        if let Some(e) = schema.get("enum").and_then(|e| e.as_sequence()) {
            let allowed: Vec<Value> = e
                .iter()
                .map(|x| serde_json::to_value(x).expect("enum value"))
                .collect();
            if !allowed.contains(v) {
                return Err(format!("{at}: {v} is not one of the enum {allowed:?}"));
            }
        }
        if let (Some(p), Some(x)) = (schema.get("pattern").and_then(|p| p.as_str()), v.as_str()) {
            let re = regex_automata::meta::Regex::new(p)
                .map_err(|e| format!("{at}: the spec's pattern {p:?} does not compile: {e}"))?;
            if !re.is_match(x) {
                return Err(format!("{at}: {v} does not match the pattern {p:?}"));
            }
        }
        let num = |k: &str| schema.get(k).and_then(|m| m.as_f64());
        if let (Some(min), Some(x)) = (num("minimum"), v.as_f64()) {
            if x < min {
                return Err(format!("{at}: {v} is below the minimum {min}"));
            }
        }
        if let (Some(max), Some(x)) = (num("maximum"), v.as_f64()) {
            if x > max {
                return Err(format!("{at}: {v} is above the maximum {max}"));
            }
        }
        match schema.get("type").and_then(|t| t.as_str()) {
            Some("object") => {
                let obj = v
                    .as_object()
                    .ok_or_else(|| format!("{at}: not an object: {v}"))?;
                if let Some(req) = schema.get("required").and_then(|r| r.as_sequence()) {
                    for f in req {
                        let f = f.as_str().unwrap();
                        if !obj.contains_key(f) {
                            return Err(format!("{at}: required field {f:?} missing in {v}"));
                        }
                    }
                }
                let props = schema.get("properties").and_then(|p| p.as_mapping());
                let extra_ok = schema
                    .get("additionalProperties")
                    .and_then(|a| a.as_bool())
                    .unwrap_or(props.is_none());
                for (k, x) in obj {
                    match props.and_then(|p| p.get(k.as_str())) {
                        Some(s) => self.conforms(s, x, &format!("{at}.{k}"))?,
                        None if extra_ok => {}
                        None => return Err(format!("{at}: field {k:?} is not in the spec: {v}")),
                    }
                }
            }
            Some("array") => {
                let arr = v
                    .as_array()
                    .ok_or_else(|| format!("{at}: not an array: {v}"))?;
                for (i, x) in arr.iter().enumerate() {
                    self.conforms(&schema["items"], x, &format!("{at}[{i}]"))?;
                }
            }
            Some("string") if !v.is_string() => return Err(format!("{at}: not a string: {v}")),
            Some("integer") if !(v.is_u64() || v.is_i64()) => {
                return Err(format!("{at}: not an integer: {v}"))
            }
            Some("number") if !v.is_number() => return Err(format!("{at}: not a number: {v}")),
            Some("boolean") if !v.is_boolean() => return Err(format!("{at}: not a boolean: {v}")),
            _ => {}
        }
        Ok(())
    }

    /// A value `schema` documents as valid: its example, default, first enum value or
    /// minimum (the first alternative of a `oneOf`).
    pub fn sample(&self, schema: &Yaml) -> Value {
        let schema = self.resolve(schema);
        if let Some(alt) = schema
            .get("oneOf")
            .or_else(|| schema.get("anyOf"))
            .and_then(|a| a.as_sequence())
        {
            return self.sample(&alt[0]);
        }
        for k in ["example", "default"] {
            if let Some(x) = schema.get(k) {
                return serde_json::to_value(x).unwrap();
            }
        }
        if let Some(e) = schema.get("enum").and_then(|e| e.as_sequence()) {
            return serde_json::to_value(&e[0]).unwrap();
        }
        match schema.get("type").and_then(|t| t.as_str()) {
            Some("integer") => schema
                .get("minimum")
                .map(|m| serde_json::to_value(m).unwrap())
                .unwrap_or(Value::from(1)),
            Some("number") => Value::from(1.5),
            Some("boolean") => Value::from(true),
            Some("array") => Value::Array(vec![]),
            Some("object") => Value::Object(Default::default()),
            _ => Value::from("x"),
        }
    }

    /// The request body schema of `method template` (JSON bodies only).
    pub fn request_schema(&self, method: &Method, template: &str) -> Option<&Yaml> {
        let op = &self.doc["paths"][template][method.as_str().to_lowercase().as_str()];
        op.get("requestBody")
            .and_then(|b| b["content"].get("application/json"))
            .map(|c| self.resolve(&c["schema"]))
    }

    /// Check a response of `method template` against the spec; returns its JSON body.
    pub fn check(&self, method: &Method, template: &str, r: &RawResponse) -> Value {
        let op = &self.doc["paths"][template][method.as_str().to_lowercase().as_str()];
        assert!(!op.is_null(), "{method} {template} is not in the spec");
        let status = r.status.as_u16().to_string();
        let resp = &op["responses"][status.as_str()];
        assert!(
            !resp.is_null(),
            "{method} {template} answered {} which the spec does not document: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        let resp = self.resolve(resp);
        let content = &resp["content"];
        if let Some(schema) = content.get("application/json").map(|c| &c["schema"]) {
            let ct = r
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            assert!(
                ct.starts_with("application/json"),
                "{method} {template}: content type {ct}"
            );
            let v: Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| {
                panic!("{method} {template}: body is not JSON ({e}): {:?}", r.body)
            });
            self.check_schema(schema, &v, &format!("{method} {template} {status}"));
            return v;
        }
        Value::Null
    }
}

/// Send and check against the spec.
pub async fn call(
    c: &ApiClient,
    sp: &Spec,
    method: Method,
    template: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let (ct, bytes) = match body {
        Some(b) => (Some("application/json"), b.to_string().into_bytes()),
        None => (None, Vec::new()),
    };
    let r = c
        .send(method.clone(), path, ct, bytes)
        .await
        .expect("HTTP exchange");
    let v = sp.check(&method, template, &r);
    (r.status, v)
}

pub fn assert_error(v: &Value, code: &str) {
    assert_eq!(v["error"]["code"], code, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(msg.len() > 10, "error message too terse: {v}");
}

pub fn web_request() -> Vec<u8> {
    b"GET / HTTP/1.1\r\nHost: kscope\r\n\r\n".to_vec()
}

/// POST one web request to a VM's request URL: the service answers 200, and the guest's
/// answer, when it served the request (`x-kscope-status: 0`), passes the workload's check.
pub async fn ask_web_checked(c: &ApiClient, request_url: &str, req: &[u8]) -> RawResponse {
    let r = c
        .send(
            Method::POST,
            request_url,
            Some("application/octet-stream"),
            req.to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    if r.headers["x-kscope-status"] == "0" {
        kscope_workloads::Workload::Web.check(req, &r.body).unwrap();
    }
    r
}
