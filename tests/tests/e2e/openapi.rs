//! docs/openapi/*.yaml against the real programs: every operation of both documents is called
//! on a running proxy (and `serve`), with successes and errors, and each reply's status must be
//! documented for its operation and its body must validate against the documented schema.

use std::collections::BTreeSet;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{json, Value};
use switchyard_store::{ControlDb, RouteUpdate, RoutingState};
use switchyard_tests::{
    events_body, feed_url, stream_url, wait_for, Backend, Reply, Result, ServeProcess,
};
use uuid::Uuid;

const TOKEN: &str = "openapi-token";

/// One OpenAPI document, and which of its operations the test called.
struct Spec {
    name: &'static str,
    doc: Value,
    called: BTreeSet<(String, String)>,
}

impl Spec {
    fn load(name: &'static str) -> Result<Self> {
        let path = format!("{}/../docs/openapi/{name}", env!("CARGO_MANIFEST_DIR"));
        let doc: Value = serde_yaml::from_str(&std::fs::read_to_string(&path)?)?;
        assert_eq!(doc["openapi"], "3.1.0", "{name}");
        Ok(Self {
            name,
            doc,
            called: BTreeSet::new(),
        })
    }

    /// Replaces every `{"$ref": "#/..."}` with what it points at.
    fn resolve(&self, value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    let target = self
                        .doc
                        .pointer(r.trim_start_matches('#'))
                        .unwrap_or_else(|| panic!("{}: dangling $ref {r}", self.name));
                    return self.resolve(target);
                }
                Value::Object(
                    map.iter()
                        .map(|(k, v)| (k.clone(), self.resolve(v)))
                        .collect(),
                )
            }
            Value::Array(items) => Value::Array(items.iter().map(|v| self.resolve(v)).collect()),
            other => other.clone(),
        }
    }

    /// Checks `reply` against operation `method path` (a path template of the document).
    fn check(&mut self, method: &Method, path: &str, reply: &Reply) {
        let m = method.as_str().to_lowercase();
        self.called.insert((path.to_owned(), m.clone()));
        let operation = self.resolve(&self.doc["paths"][path][&m]);
        assert!(
            operation.is_object(),
            "{}: {method} {path} is not documented",
            self.name
        );
        let status = reply.status.as_str();
        let response = &operation["responses"][status];
        assert!(
            response.is_object(),
            "{}: {method} {path} answered {status}, which is not documented; body {}",
            self.name,
            String::from_utf8_lossy(&reply.body)
        );
        self.validate(response, reply, &format!("{method} {path} {status}"));
    }

    /// Checks `reply` against a reusable response of the document (`components/responses/…`).
    fn check_component(&self, name: &str, reply: &Reply) {
        let response = self.resolve(&self.doc["components"]["responses"][name]);
        assert!(response.is_object(), "{}: no response {name}", self.name);
        self.validate(&response, reply, name);
    }

    fn validate(&self, response: &Value, reply: &Reply, what: &str) {
        let content_type = reply
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        // The exact media type, or the same type with other parameters (charset…).
        let essence = |t: &str| t.split(';').next().unwrap_or("").trim().to_owned();
        let content = response["content"]
            .get(content_type)
            .or_else(|| {
                response["content"]
                    .as_object()?
                    .iter()
                    .find(|(k, _)| essence(k) == essence(content_type))
                    .map(|(_, v)| v)
            })
            .unwrap_or_else(|| {
                panic!(
                    "{}: {what}: content type {content_type:?} not documented ({:?})",
                    self.name,
                    response["content"]
                        .as_object()
                        .map(|c| c.keys().collect::<Vec<_>>())
                )
            });
        for (header, _) in response["headers"].as_object().into_iter().flatten() {
            if reply.status == StatusCode::SERVICE_UNAVAILABLE {
                assert!(
                    reply.headers.contains_key(header.as_str()),
                    "{}: {what}: header {header} missing",
                    self.name
                );
            }
        }
        let instance = if content_type.starts_with("application/json") {
            reply.json.clone()
        } else {
            Value::String(String::from_utf8_lossy(&reply.body).into_owned())
        };
        validate_against(
            &content["schema"],
            &instance,
            &format!("{}: {what}", self.name),
        );
    }

    /// Every operation of the document was called at least once.
    fn assert_all_called(&self) {
        let mut missing = Vec::new();
        for (path, item) in self.doc["paths"].as_object().into_iter().flatten() {
            for method in ["get", "post", "put", "delete", "patch"] {
                if item.get(method).is_some()
                    && !self.called.contains(&(path.clone(), method.to_owned()))
                {
                    missing.push(format!("{method} {path}"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "{}: operations never exercised: {missing:?}",
            self.name
        );
    }
}

fn validate_against(schema: &Value, instance: &Value, what: &str) {
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .build(schema)
        .unwrap_or_else(|e| panic!("{what}: the schema itself is invalid: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what}: reply does not match the schema: {errors:#?}\nreply: {instance:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_programs_answer_as_the_openapi_documents_say() -> Result<()> {
    let mut data = Spec::load("data-plane.yaml")?;
    let mut admin = Spec::load("admin.yaml")?;
    let extra = format!(
        "[proxy]\nadmin_token = \"{TOKEN}\"\ngate_wait_ms = 200\nrouting_poll_ms = 50\nmax_body_bytes = 4096\n"
    );
    let (env, proxy, http) =
        switchyard_tests::started(Backend::Sqlite, &["shared", "dedicated"], &extra, &[]).await?;
    let (base, adm) = (proxy.data.clone(), proxy.admin.clone());
    let stream_path = "/v1/tenants/{tenant_id}/streams/{aggregate_type}/{aggregate_id}/events";
    let feed_path = "/v1/tenants/{tenant_id}/events";
    let (tenant, other, stuck) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let order = Uuid::new_v4();
    let url = stream_url(&base, tenant, "Order", order);
    let request_schema = data.resolve(&data.doc["components"]["schemas"]["AppendRequest"]);

    // Append: 201, an idempotent retry 201, a version conflict 409.
    let body = events_body(Some(0), 2, "OrderCreated");
    validate_against(&request_schema, &body, "the test's own append body");
    let reply = http.post(&url, &body).await?;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
    data.check(&Method::POST, stream_path, &reply);
    let retry = http.post(&url, &body).await?;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(
        retry.json, reply.json,
        "a retry answers the original result"
    );
    let conflict = http
        .post(&url, &events_body(Some(0), 1, "OrderCreated"))
        .await?;
    assert_eq!(conflict.status, StatusCode::CONFLICT);
    assert_eq!(conflict.json["error"], "version_conflict");
    data.check(&Method::POST, stream_path, &conflict);
    // No event_id, no expected_version: valid too.
    let minimal = json!({"events": [{"event_type": "OrderPaid", "payload": {}}]});
    validate_against(&request_schema, &minimal, "a minimal append body");
    let reply = http.post(&url, &minimal).await?;
    assert_eq!(reply.status, StatusCode::CREATED);
    data.check(&Method::POST, stream_path, &reply);

    // Malformed: 400; empty: 422; too large: 413; another tenant's stream: 404.
    let malformed = http
        .request(Method::POST, &url, "{\"events\": [", &[])
        .await?;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    data.check(&Method::POST, stream_path, &malformed);
    let empty = http.post(&url, &json!({"events": []})).await?;
    assert_eq!(empty.status, StatusCode::UNPROCESSABLE_ENTITY);
    data.check(&Method::POST, stream_path, &empty);
    let big = http
        .post(
            &url,
            &json!({"events": [{"event_type": "Big", "payload": {"x": "y".repeat(5000)}}]}),
        )
        .await?;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
    data.check(&Method::POST, stream_path, &big);
    let foreign = http
        .post(
            &stream_url(&base, other, "Order", order),
            &events_body(None, 1, "X"),
        )
        .await?;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND, "{:?}", foreign.json);
    data.check(&Method::POST, stream_path, &foreign);

    // Reads: a page with `next`, a bad limit, the feed.
    let page = http.get(&format!("{url}?from_version=1&limit=2")).await?;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.json["next"], 3);
    data.check(&Method::GET, stream_path, &page);
    let bad = http.get(&format!("{url}?limit=0")).await?;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    data.check(&Method::GET, stream_path, &bad);
    let feed = http.get(&feed_url(&base, tenant)).await?;
    assert_eq!(feed.status, StatusCode::OK);
    assert_eq!(feed.json["events"].as_array().map(Vec::len), Some(3));
    data.check(&Method::GET, feed_path, &feed);
    let bad = http
        .get(&format!("{}?after_position=x", feed_url(&base, tenant)))
        .await?;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    data.check(&Method::GET, feed_path, &bad);
    // A cursor of a store the tenant was never migrated from.
    let foreign_cursor = http
        .get(&format!(
            "{}?after_position=2&after_store=dedicated",
            feed_url(&base, tenant)
        ))
        .await?;
    assert_eq!(foreign_cursor.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(foreign_cursor.json["error"], "cursor_not_translatable");
    data.check(&Method::GET, feed_path, &foreign_cursor);

    // The reads and kinds a client library needs (issue 18).
    for expected in [
        json!("no_stream"),
        json!("stream_exists"),
        json!("any"),
        json!(7),
    ] {
        let body =
            json!({"expected_version": expected, "events": [{"event_type": "K", "payload": {}}]});
        validate_against(
            &request_schema,
            &body,
            "an append body with an expected_version kind",
        );
    }
    let exists = http
        .post(&url, &json!({"expected_version": "stream_exists", "events": [{"event_type": "K", "payload": {}}]}))
        .await?;
    assert_eq!(exists.status, StatusCode::CREATED, "{:?}", exists.json);
    data.check(&Method::POST, stream_path, &exists);
    let refused = http
        .post(&stream_url(&base, tenant, "Order", Uuid::new_v4()), &json!({"expected_version": "stream_exists", "events": [{"event_type": "K", "payload": {}}]}))
        .await?;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    data.check(&Method::POST, stream_path, &refused);
    let backward = http
        .get(&format!("{url}?direction=backward&to_version=3&limit=2"))
        .await?;
    assert_eq!(backward.json["next"], 1);
    data.check(&Method::GET, stream_path, &backward);
    let version_path = "/v1/tenants/{tenant_id}/streams/{aggregate_type}/{aggregate_id}/version";
    let version = http
        .get(&format!(
            "{base}/v1/tenants/{tenant}/streams/Order/{order}/version"
        ))
        .await?;
    assert_eq!(version.json["version"], 4);
    data.check(&Method::GET, version_path, &version);
    let bad = http
        .get(&format!(
            "{base}/v1/tenants/{tenant}/streams/Order/nope/version"
        ))
        .await?;
    data.check(&Method::GET, version_path, &bad);
    let event_path = "/v1/tenants/{tenant_id}/events/{event_id}";
    let some_id = feed.json["events"][0]["event_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    for id in [some_id, Uuid::new_v4().to_string(), "nope".to_owned()] {
        let found = http
            .get(&format!("{base}/v1/tenants/{tenant}/events/{id}"))
            .await?;
        data.check(&Method::GET, event_path, &found);
    }
    let category_path = "/v1/tenants/{tenant_id}/categories/{aggregate_type}/events";
    let category = http
        .get(&format!(
            "{base}/v1/tenants/{tenant}/categories/Order/events?limit=2"
        ))
        .await?;
    assert!(category.json["next"].is_object(), "{:?}", category.json);
    data.check(&Method::GET, category_path, &category);
    let from = category.json["events"][0]["stored_at"]
        .as_str()
        .unwrap_or_default()
        .replace('+', "%2B");
    let category = http
        .get(&format!(
            "{base}/v1/tenants/{tenant}/categories/Order/events?from_timestamp={from}"
        ))
        .await?;
    assert_eq!(category.status, StatusCode::OK);
    data.check(&Method::GET, category_path, &category);
    let bad = http
        .get(&format!(
            "{base}/v1/tenants/{tenant}/categories/Order/events?from_timestamp=x"
        ))
        .await?;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    data.check(&Method::GET, category_path, &bad);
    let typed = http
        .get(&format!("{}?aggregate_type=Order", feed_url(&base, tenant)))
        .await?;
    data.check(&Method::GET, feed_path, &typed);
    let position_path = "/v1/tenants/{tenant_id}/position";
    for t in [tenant, Uuid::new_v4()] {
        let position = http.get(&format!("{base}/v1/tenants/{t}/position")).await?;
        data.check(&Method::GET, position_path, &position);
    }

    // Unknown path 404, wrong method 405.
    let nowhere = http.get(&format!("{base}/v1/nowhere")).await?;
    assert_eq!(nowhere.status, StatusCode::NOT_FOUND);
    data.check_component("NotFound", &nowhere);
    let wrong = http.request(Method::PUT, &url, "{}", &[]).await?;
    assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
    data.check_component("MethodNotAllowed", &wrong);

    // A tenant held at its gate past gate_wait_ms: 503 writes_paused with Retry-After.
    let control = ControlDb::connect(&env.control_url, 2)?;
    control
        .set_route(&RouteUpdate {
            tenant_id: stuck,
            store_id: "shared".to_owned(),
            migration_state: RoutingState::CutoverPaused,
            target_store_id: Some("dedicated".to_owned()),
            active_migration_id: None,
        })
        .await?;
    let route_url = format!("{adm}/admin/routes/{stuck}");
    // Every admin call but the probes' needs the token.
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("authorization", bearer.as_str())];
    let get = |url: String| {
        let http = http.clone();
        async move { http.request(Method::GET, &url, "", &auth).await }
    };
    wait_for(Duration::from_secs(10), || async {
        Ok(get(route_url.clone()).await?.json["state"] == "cutover_paused")
    })
    .await?;
    let paused = http
        .post(
            &stream_url(&base, stuck, "Order", Uuid::new_v4()),
            &events_body(Some(0), 1, "X"),
        )
        .await?;
    assert_eq!(paused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(paused.json["error"], "writes_paused");
    data.check(&Method::POST, stream_path, &paused);

    // Admin port of the proxy.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let reply = http.get(&format!("{adm}{path}")).await?;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        admin.check(&Method::GET, path, &reply);
    }
    for (path, template) in [
        ("/admin/routes".to_owned(), "/admin/routes"),
        (
            format!("/admin/routes/{stuck}"),
            "/admin/routes/{tenant_id}",
        ),
        ("/admin/log-level".to_owned(), "/admin/log-level"),
    ] {
        let denied = http.get(&format!("{adm}{path}")).await?;
        assert_eq!(denied.status, StatusCode::UNAUTHORIZED, "{path}");
        admin.check(&Method::GET, template, &denied);
    }
    let routes = get(format!("{adm}/admin/routes")).await?;
    assert_eq!(routes.status, StatusCode::OK);
    admin.check(&Method::GET, "/admin/routes", &routes);
    let route = get(route_url.clone()).await?;
    assert_eq!(route.json["target_store_id"], "dedicated");
    admin.check(&Method::GET, "/admin/routes/{tenant_id}", &route);
    let bad = get(format!("{adm}/admin/routes/not-a-uuid")).await?;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    admin.check(&Method::GET, "/admin/routes/{tenant_id}", &bad);
    let reload = format!("{adm}/admin/routes/reload");
    let denied = http.request(Method::POST, &reload, "", &[]).await?;
    assert_eq!(denied.status, StatusCode::UNAUTHORIZED);
    admin.check(&Method::POST, "/admin/routes/reload", &denied);
    let reloaded = http.request(Method::POST, &reload, "", &auth).await?;
    assert_eq!(reloaded.status, StatusCode::OK);
    admin.check(&Method::POST, "/admin/routes/reload", &reloaded);
    let resume = format!("{adm}/admin/tenants/{stuck}/resume-writes");
    let resumed = http.request(Method::POST, &resume, "", &auth).await?;
    assert_eq!(resumed.status, StatusCode::OK);
    assert_eq!(resumed.json["state"], "normal");
    admin.check(
        &Method::POST,
        "/admin/tenants/{tenant_id}/resume-writes",
        &resumed,
    );
    let level = format!("{adm}/admin/log-level");
    let current = get(level.clone()).await?;
    assert_eq!(current.status, StatusCode::OK);
    admin.check(&Method::GET, "/admin/log-level", &current);
    let denied = http
        .request(Method::PUT, &level, r#"{"level":"debug"}"#, &[])
        .await?;
    assert_eq!(denied.status, StatusCode::UNAUTHORIZED);
    admin.check(&Method::PUT, "/admin/log-level", &denied);
    let typo = http
        .request(Method::PUT, &level, r#"{"level":"loud"}"#, &auth)
        .await?;
    assert_eq!(typo.status, StatusCode::BAD_REQUEST);
    admin.check(&Method::PUT, "/admin/log-level", &typo);
    let set = http
        .request(Method::PUT, &level, r#"{"level":"info"}"#, &auth)
        .await?;
    assert_eq!(set.status, StatusCode::OK);
    admin.check(&Method::PUT, "/admin/log-level", &set);
    let wrong = get(resume.clone()).await?;
    assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
    admin.check_component("MethodNotAllowed", &wrong);
    let nowhere = get(format!("{adm}/nowhere")).await?;
    assert_eq!(nowhere.status, StatusCode::NOT_FOUND);
    admin.check_component("NotFound", &nowhere);

    // A proxy with data tokens: no token or an unknown one 401, another tenant's 403.
    let tokens = env.dir.path.join("data-tokens");
    std::fs::write(&tokens, format!("openapi-data-token-1 {tenant}\n"))?;
    let guarded = env.proxy(&[(
        "SWITCHYARD_PROXY_DATA_TOKENS_FILE",
        &tokens.display().to_string(),
    )])?;
    guarded.wait_ready(&http).await?;
    let app = [("authorization", "Bearer openapi-data-token-1")];
    let unknown = [("authorization", "Bearer openapi-data-token-2")];
    for (method, url, path, body) in [
        (
            Method::POST,
            stream_url(&guarded.data, other, "Order", order),
            stream_path,
            serde_json::to_vec(&events_body(None, 1, "X"))?,
        ),
        (
            Method::GET,
            stream_url(&guarded.data, other, "Order", order),
            stream_path,
            Vec::new(),
        ),
        (
            Method::GET,
            feed_url(&guarded.data, other),
            feed_path,
            Vec::new(),
        ),
    ] {
        for headers in [&[][..], &unknown[..]] {
            let refused = http
                .request(method.clone(), &url, body.clone(), headers)
                .await?;
            assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{method} {url}");
            assert_eq!(refused.headers["www-authenticate"], "Bearer");
            data.check(&method, path, &refused);
        }
        let forbidden = http.request(method.clone(), &url, body, &app).await?;
        assert_eq!(forbidden.status, StatusCode::FORBIDDEN, "{method} {url}");
        data.check(&method, path, &forbidden);
    }
    let allowed = http
        .request(Method::GET, &feed_url(&guarded.data, tenant), "", &app)
        .await?;
    assert_eq!(allowed.status, StatusCode::OK);
    data.check(&Method::GET, feed_path, &allowed);
    drop(guarded);

    // Admin port of `serve`: the same health, readiness and metrics operations.
    let serve = ServeProcess::spawn(&env.config_path, "openapi", &[])?;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let reply = http.get(&format!("{}{path}", serve.admin)).await?;
        assert_eq!(reply.status, StatusCode::OK, "serve {path}");
        admin.check(&Method::GET, path, &reply);
    }
    let wrong = http
        .request(Method::POST, &format!("{}/metrics", serve.admin), "", &[])
        .await?;
    assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
    admin.check_component("MethodNotAllowed", &wrong);
    let nowhere = http.get(&format!("{}/nowhere", serve.admin)).await?;
    assert_eq!(nowhere.status, StatusCode::NOT_FOUND);
    admin.check_component("NotFound", &nowhere);

    data.assert_all_called();
    admin.assert_all_called();
    control.close().await;
    Ok(())
}
