//! System tests of the API's contract, with a real HTTP client (hyper) against the real
//! service started in-process: the router serves exactly the routes of `openapi.yaml`, auth is
//! required and enforced, and bad input gets a 4xx with a JSON error.

mod api_util;

use std::collections::{BTreeMap, BTreeSet};

use api_util::*;
use hyper::{Method, StatusCode};
use kscope::server::Limits;
use serde_json::{json, Value};

// ---------- tests ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spec_and_router_match() {
    let sp = spec();
    let (srv, c) = start(Limits::default(), |_| {}).await;
    let spec_paths = sp.paths();
    let served: BTreeMap<String, BTreeSet<String>> = srv
        .routes()
        .iter()
        .map(|(p, m)| (p.to_string(), m.iter().map(|m| m.to_string()).collect()))
        .collect();
    assert_eq!(
        served, spec_paths,
        "the router's routes differ from openapi.yaml"
    );
    // Probe every path with every method: documented ones are served (never `no_route` or
    // 405), the others answer 405; all answers are documented.
    for (path, methods) in &spec_paths {
        let concrete = path.replace("{id}", "vm-999").replace("{name}", "nosuch");
        for m in [Method::GET, Method::POST, Method::DELETE, Method::PUT] {
            let r = c
                .send(
                    m.clone(),
                    &concrete,
                    Some("application/json"),
                    b"{}".to_vec(),
                )
                .await
                .unwrap();
            if methods.contains(m.as_str()) {
                assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{m} {path}");
                assert_ne!(r.error_code(), "no_route", "{m} {path}");
                sp.check(&m, path, &r);
            } else {
                assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{m} {path}");
                assert_error(&r.json(), "method_not_allowed");
            }
        }
    }
    let r = c
        .send(Method::GET, "/v1/nothing", None, vec![])
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_error(&r.json(), "no_route");
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auth_is_required_and_enforced() {
    let sp = spec();
    let dir = temp_dir();
    let d2 = dir.clone();
    let (srv, c) = start(Limits::default(), move |o| o.state_dir = Some(d2)).await;
    // The token was generated into the state dir with mode 0600.
    let tf = dir.join("token");
    let meta = std::fs::metadata(&tf).expect("token file created");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(&tf).unwrap().trim(), srv.token());
    assert!(srv.token().len() >= 32);

    let anon = c.with_token(None);
    let wrong = c.with_token(Some(format!("{}x", srv.token())));
    let (st, v) = call(&anon, &sp, Method::GET, "/v1/health", "/v1/health", None).await;
    assert_eq!((st, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    for who in [&anon, &wrong] {
        for (m, p, t) in [
            (Method::GET, "/v1/vms", "/v1/vms"),
            (Method::POST, "/v1/vms", "/v1/vms"),
            (Method::GET, "/metrics", "/metrics"),
            (Method::DELETE, "/v1/vms/vm-1", "/v1/vms/{id}"),
        ] {
            let body = (m == Method::POST).then(|| json!({"workload": "web"}));
            let (st, v) = call(who, &sp, m.clone(), t, p, body).await;
            assert_eq!(st, StatusCode::UNAUTHORIZED, "{m} {p}");
            assert_error(&v, "unauthorized");
        }
    }
    // Not a bearer scheme.
    let r = anon
        .send(Method::GET, "/v1/vms", None, vec![])
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        srv.state().registry.list().is_empty(),
        "no VM was created without auth"
    );
    let (st, v) = call(&c, &sp, Method::GET, "/v1/vms", "/v1/vms", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["vms"], json!([]));
    srv.shutdown().await.unwrap();

    // A given token is used as is; a restart reuses the stored one.
    let d3 = dir.clone();
    let (srv2, _) = start(Limits::default(), move |o| o.state_dir = Some(d3)).await;
    assert_eq!(srv2.token(), std::fs::read_to_string(&tf).unwrap().trim());
    srv2.shutdown().await.unwrap();
    let (srv3, c3) = start(Limits::default(), |o| {
        o.token = Some("0123456789abcdef-given".into())
    })
    .await;
    assert_eq!(srv3.token(), "0123456789abcdef-given");
    assert_eq!(
        c3.send(Method::GET, "/v1/vms", None, vec![])
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    srv3.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_4xx_with_json_errors() {
    let sp = spec();
    let (srv, c) = start(Limits::default(), |_| {}).await;
    let cases: Vec<(Value, &str)> = vec![
        (json!({"workload": "nosuch"}), "unknown_workload"),
        (
            json!({"workload": "web", "memory": "lots"}),
            "bad_memory_size",
        ),
        (
            json!({"workload": "web", "memory": "3M"}),
            "bad_memory_size",
        ),
        (
            json!({"workload": "web", "memory": "5000G"}),
            "bad_memory_size",
        ),
        (json!({"workload": "web", "colour": "red"}), "invalid_json"),
        (json!({"memory": "64M"}), "invalid_json"),
        (json!([1, 2]), "invalid_json"),
    ];
    for (body, code) in cases {
        let (st, v) = call(
            &c,
            &sp,
            Method::POST,
            "/v1/vms",
            "/v1/vms",
            Some(body.clone()),
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
        assert_error(&v, code);
    }
    let r = c
        .send(
            Method::POST,
            "/v1/vms",
            Some("application/json"),
            b"{\"workload\": ".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_error(&sp.check(&Method::POST, "/v1/vms", &r), "invalid_json");
    let r = c
        .send(Method::POST, "/v1/vms", Some("text/plain"), b"web".to_vec())
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_error(
        &sp.check(&Method::POST, "/v1/vms", &r),
        "unsupported_media_type",
    );
    // Too large bodies, JSON and raw.
    let big = vec![b' '; 2 << 20];
    let r = c
        .send(
            Method::POST,
            "/v1/vms",
            Some("application/json"),
            big.clone(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error(&sp.check(&Method::POST, "/v1/vms", &r), "payload_too_large");
    let r = c
        .send(
            Method::POST,
            "/v1/vms/vm-1/requests",
            Some("application/octet-stream"),
            big,
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error(
        &sp.check(&Method::POST, "/v1/vms/{id}/requests", &r),
        "payload_too_large",
    );
    // Clone parameters are validated before anything else.
    for (body, code) in [
        (json!({"n": 0}), "bad_clone_count"),
        (json!({"n": 1000}), "bad_clone_count"),
        (json!({"n": -3}), "bad_clone_count"),
        (json!({"n": 1, "memory_mode": "warm"}), "bad_memory_mode"),
        (json!({"n": 1, "prefetch": "psychic"}), "unknown_policy"),
        (json!({"n": "two"}), "invalid_json"),
    ] {
        let (st, v) = call(
            &c,
            &sp,
            Method::POST,
            "/v1/vms/{id}/clones",
            "/v1/vms/vm-1/clones",
            Some(body.clone()),
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
        assert_error(&v, code);
    }
    // Unknown ids.
    for (m, t, p, b) in [
        (Method::GET, "/v1/vms/{id}", "/v1/vms/vm-42", None),
        (Method::DELETE, "/v1/vms/{id}", "/v1/vms/vm-42", None),
        (
            Method::POST,
            "/v1/vms/{id}/pause",
            "/v1/vms/vm-42/pause",
            None,
        ),
        (
            Method::POST,
            "/v1/vms/{id}/resume",
            "/v1/vms/vm-42/resume",
            None,
        ),
        (
            Method::GET,
            "/v1/vms/{id}/stats",
            "/v1/vms/vm-42/stats",
            None,
        ),
        (
            Method::POST,
            "/v1/vms/{id}/clones",
            "/v1/vms/vm-42/clones",
            Some(json!({"n": 1})),
        ),
        (
            Method::POST,
            "/v1/vms/{id}/snapshots",
            "/v1/vms/vm-42/snapshots",
            Some(json!({"name": "s1"})),
        ),
        (
            Method::POST,
            "/v1/snapshots/{name}/restore",
            "/v1/snapshots/s1/restore",
            None,
        ),
    ] {
        let (st, v) = call(&c, &sp, m.clone(), t, p, b).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{m} {p}");
        assert_error(&v, "not_found");
    }
    let r = c
        .send(
            Method::POST,
            "/v1/vms/vm-42/requests",
            Some("application/octet-stream"),
            web_request(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let (st, v) = call(
        &c,
        &sp,
        Method::POST,
        "/v1/vms/{id}/snapshots",
        "/v1/vms/vm-1/snapshots",
        Some(json!({"name": "../etc"})),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_error(&v, "bad_snapshot_name");
    // Errors are counted in /metrics.
    let r = c.send(Method::GET, "/metrics", None, vec![]).await.unwrap();
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        text.contains("kscope_api_errors_total{code=\"invalid_json\"}"),
        "{text}"
    );
    srv.shutdown().await.unwrap();
}

/// Request bodies against their schemas in `openapi.yaml`, generated from the spec: for every
/// field of every JSON body, a value of each JSON type is sent; the server must refuse (400)
/// exactly the ones the spec does not allow, and accept (never 400) the ones it does. Unknown
/// fields, missing required fields and values outside enums or bounds are refused. Valid bodies
/// stop at a documented non-400 answer without creating anything (the parent limit is 0 and
/// the VMs do not exist). Every answer is checked against the spec.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_bodies_match_their_schemas() {
    let sp = spec();
    let limits = Limits {
        max_vms: 0,
        ..Limits::default()
    };
    let (srv, c) = start(limits, |_| {}).await;
    let routes = [
        (
            Method::POST,
            "/v1/vms",
            "/v1/vms",
            StatusCode::TOO_MANY_REQUESTS,
        ),
        (
            Method::POST,
            "/v1/vms/{id}/clones",
            "/v1/vms/vm-999/clones",
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/v1/vms/{id}/snapshots",
            "/v1/vms/vm-999/snapshots",
            StatusCode::NOT_FOUND,
        ),
    ];
    let mut checked = 0;
    for (m, template, path, valid_status) in routes {
        let schema = sp
            .request_schema(&m, template)
            .unwrap_or_else(|| panic!("{m} {template} has no JSON body in the spec"))
            .clone();
        assert_eq!(
            schema["additionalProperties"].as_bool(),
            Some(false),
            "{template}: request schemas must refuse unknown fields"
        );
        let props = schema["properties"].as_mapping().unwrap().clone();
        let required: Vec<String> = schema["required"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect();
        let mut valid = serde_json::Map::new();
        for (k, s) in &props {
            valid.insert(k.as_str().unwrap().to_string(), sp.sample(s));
        }
        let send = |body: Value| {
            let (c, sp, m) = (&c, &sp, m.clone());
            async move { call(c, sp, m, template, path, Some(body)).await }
        };
        // The spec's own sample body is accepted.
        let (st, v) = send(Value::Object(valid.clone())).await;
        assert_eq!(st, valid_status, "{template}: sample body {valid:?}: {v}");
        for (k, s) in &props {
            let k = k.as_str().unwrap();
            let typed = |t: &str| -> Value {
                let s = sp.resolve(s);
                let alts: Vec<&serde_yaml::Value> = match s
                    .get("oneOf")
                    .or_else(|| s.get("anyOf"))
                    .and_then(|a| a.as_sequence())
                {
                    Some(a) => a.iter().collect(),
                    None => vec![s],
                };
                match alts.iter().find(|a| a["type"].as_str() == Some(t)) {
                    Some(a) => sp.sample(a),
                    None => match t {
                        "string" => json!("x"),
                        "integer" => json!(7),
                        "number" => json!(2.5),
                        "boolean" => json!(true),
                        "array" => json!([]),
                        "object" => json!({}),
                        _ => Value::Null,
                    },
                }
            };
            let mut tries: Vec<Value> = [
                "string", "integer", "number", "boolean", "array", "object", "null",
            ]
            .into_iter()
            .map(typed)
            .collect();
            let s = sp.resolve(s);
            if s.get("enum").is_some()
                || s.get("oneOf").is_some_and(|a| {
                    a.as_sequence()
                        .unwrap()
                        .iter()
                        .any(|x| x.get("enum").is_some())
                        && !a
                            .as_sequence()
                            .unwrap()
                            .iter()
                            .any(|x| x.get("pattern").is_some())
                })
            {
                tries.push(json!("zzz-not-in-the-enum"));
            }
            // A string the spec's pattern refuses (where the field has one).
            let has_pattern = s.get("pattern").is_some()
                || ["oneOf", "anyOf"].iter().any(|alt| {
                    s.get(*alt)
                        .and_then(|a| a.as_sequence())
                        .is_some_and(|a| a.iter().any(|x| sp.resolve(x).get("pattern").is_some()))
                });
            if has_pattern {
                tries.push(json!("!not-in-the-pattern!"));
                tries.push(json!(""));
            }
            for bound in ["minimum", "maximum"] {
                let b = s.get(bound).or_else(|| {
                    s.get("oneOf")
                        .and_then(|a| a.as_sequence())
                        .and_then(|a| a.iter().find_map(|x| x.get(bound)))
                });
                if let Some(b) = b.and_then(|b| b.as_i64()) {
                    tries.push(json!(if bound == "minimum" { b - 1 } else { b + 1 }));
                }
            }
            for x in tries {
                let mut body = valid.clone();
                body.insert(k.to_string(), x.clone());
                let allowed = sp.conforms(s, &x, k).is_ok();
                let (st, v) = send(Value::Object(body)).await;
                checked += 1;
                if allowed {
                    assert_eq!(
                        st, valid_status,
                        "{template}: {k} = {x} is allowed by the spec but the server answered {v}"
                    );
                } else {
                    assert_eq!(st, StatusCode::BAD_REQUEST, "{template}: {k} = {x} is not allowed by the spec but the server answered {st} {v}");
                }
            }
            if required.iter().any(|r| r == k) {
                let mut body = valid.clone();
                body.remove(k);
                let (st, v) = send(Value::Object(body)).await;
                assert_eq!(
                    st,
                    StatusCode::BAD_REQUEST,
                    "{template}: without required {k}: {v}"
                );
            }
        }
        let mut body = valid.clone();
        body.insert("colour".into(), json!("red"));
        let (st, v) = send(Value::Object(body)).await;
        assert_eq!(
            st,
            StatusCode::BAD_REQUEST,
            "{template}: unknown field: {v}"
        );
        // JSON routes refuse other content types with a documented 415.
        let r = c
            .send(m.clone(), path, Some("text/plain"), b"{}".to_vec())
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{template}");
        assert_error(&sp.check(&m, template, &r), "unsupported_media_type");
    }
    assert!(checked > 20, "only {checked} field values were tried");

    // The prefetch enum is exactly the set of policy names the server takes.
    let clones = sp
        .request_schema(&Method::POST, "/v1/vms/{id}/clones")
        .unwrap();
    let enum_names: Vec<String> = sp.resolve(&clones["properties"]["prefetch"])["anyOf"][0]["enum"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    for name in kscope_policies::PolicyName::ALL.map(|p| p.as_str()) {
        let (st, v) = call(
            &c,
            &sp,
            Method::POST,
            "/v1/vms/{id}/clones",
            "/v1/vms/vm-999/clones",
            Some(json!({"n": 1, "prefetch": name})),
        )
        .await;
        let accepted = st == StatusCode::NOT_FOUND;
        assert_eq!(
            accepted,
            enum_names.iter().any(|n| n == name),
            "policy {name}: the server {} it but the spec's enum is {enum_names:?}: {v}",
            if accepted { "takes" } else { "refuses" }
        );
    }
    srv.shutdown().await.unwrap();
}
