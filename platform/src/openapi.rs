//! The API document (OpenAPI 3.1), derived from the code: the wire and stored types
//! (`ToSchema`) and each handler's `#[utoipa::path]`, one part per component, assembled here
//! with the security schemes and the answers the HTTP edge can give on any route (auth,
//! in-flight limits, timeouts, malformed paths). Served at `GET /v1/openapi.json`, written
//! by `mysimbdp openapi`, and committed as `docs/openapi.json`, which a test compares.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Map, Value, json};
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

use crate::batch::BatchDoc;
use crate::coredms::CoredmsDoc;
use crate::http::EdgeDoc;
use crate::pipeline::AppsDoc;
use crate::stream::StreamDoc;

/// Where the platform serves the document.
pub const PATH: &str = "/v1/openapi.json";

/// The document's frame: what the platform is, and its own route.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "mysimbdp",
        description = "A multi-tenant big-data ingestion platform: tenants stage batch files and publish stream messages, their own sandboxed apps turn them into documents in their own MongoDB database, and every ingestion is logged. Errors are `{\"error\": \"...\"}` with a 4xx or 503 status; 429 and 503 from the limits carry `Retry-After`. Another tenant's resources answer 404, exactly as for a tenant that does not exist."
    ),
    paths(serve),
    tags(
        (name = "tenants", description = "tenant profiles (created by the admin)"),
        (name = "apps", description = "the tenants' batch and stream ingest apps"),
        (name = "files", description = "batch ingestion: staged files and their runs"),
        (name = "stream", description = "stream ingestion: messages, consumers, dead letters, reports"),
        (name = "logs", description = "the ingestion log and its analytics"),
        (name = "documents", description = "what was stored"),
        (name = "platform", description = "health, metrics, this document"),
        (name = "internal", description = "between the components of a split deployment"),
    )
)]
struct Frame;

/// The whole API document, as served and committed.
pub fn document() -> Value {
    let mut doc = Frame::openapi();
    doc.merge(CoredmsDoc::openapi());
    doc.merge(AppsDoc::openapi());
    doc.merge(BatchDoc::openapi());
    doc.merge(StreamDoc::openapi());
    doc.merge(EdgeDoc::openapi());
    add_security_schemes(&mut doc);
    let mut json = serde_json::to_value(&doc).unwrap_or(Value::Null);
    if let Some(schemas) = json
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        merge_flattened(schemas);
    }
    add_edge_responses(&mut json);
    binary_bodies(&mut json);
    integer_bounds(&mut json);
    json
}

/// The unsigned integers' upper bounds, which the formats (`uint32`, `uint64`) imply but
/// generators and validators do not read: past them, serde refuses the number (422).
/// 64-bit ones stop at 2^63 - 1: what is kept is kept as BSON, whose integers are i64.
/// utoipa 5 writes those formats in kebab case (`u-int32`); they are named as the OpenAPI
/// format registry names them.
fn integer_bounds(v: &mut Value) {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(f)) = o.get_mut("format")
                && let Some(bits) = f.strip_prefix("u-int")
            {
                *f = format!("uint{bits}");
            }
            let max: Option<u64> = match o.get("format").and_then(Value::as_str) {
                Some("uint8") => Some(u8::MAX.into()),
                Some("uint16") => Some(u16::MAX.into()),
                Some("uint32") => Some(u32::MAX.into()),
                Some("uint64") => Some(crate::config::MAX_STORED_INT),
                _ => None,
            };
            if let Some(max) = max {
                o.entry("maximum").or_insert(json!(max));
            }
            o.values_mut().for_each(integer_bounds);
        }
        Value::Array(a) => a.iter_mut().for_each(integer_bounds),
        _ => {}
    }
}

/// Bodies sent as bytes (`application/octet-stream`: file uploads, byte messages) come out
/// of utoipa as arrays of integers (`Vec<u8>`); on the wire they are the bytes themselves,
/// which OpenAPI writes as a binary string.
fn binary_bodies(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for op in paths.values_mut().filter_map(Value::as_object_mut) {
        for op in op.values_mut() {
            if let Some(body) = op.pointer_mut("/requestBody/content/application~1octet-stream") {
                body["schema"] = json!({"type": "string", "format": "binary"});
            }
        }
    }
}

/// A struct with a `#[serde(flatten)]` field comes out of utoipa as `allOf` its parts, and a
/// part that denies unknown fields (`additionalProperties: false`) then forbids the others'
/// fields: no object satisfies them all (`CreateTenant`: `name` beside `AdminPatch`). Serde
/// reads such a struct as one object with every part's fields, unknown ones refused; so is
/// each written here.
fn merge_flattened(schemas: &mut Map<String, Value>) {
    let names: Vec<String> = schemas
        .iter()
        .filter(|(_, s)| s.get("allOf").is_some())
        .map(|(n, _)| n.clone())
        .collect();
    for name in names {
        if let Some(merged) = schemas.get(&name).map(|s| merged_object(schemas, s)) {
            schemas.insert(name, merged);
        }
    }
}

/// `schema` as one object: its `allOf` parts (references followed) merged, recursively.
fn merged_object(schemas: &Map<String, Value>, schema: &Value) -> Value {
    let Some(parts) = schema.get("allOf").and_then(Value::as_array) else {
        return schema.clone();
    };
    let mut properties = Map::new();
    let mut required: Vec<Value> = Vec::new();
    let mut closed = false;
    for part in parts {
        let part = match part.get("$ref").and_then(Value::as_str) {
            Some(r) => r
                .strip_prefix("#/components/schemas/")
                .and_then(|n| schemas.get(n))
                .map_or(Value::Null, |s| merged_object(schemas, s)),
            None => merged_object(schemas, part),
        };
        if let Some(p) = part.get("properties").and_then(Value::as_object) {
            properties.extend(p.clone());
        }
        if let Some(r) = part.get("required").and_then(Value::as_array) {
            required.extend(r.iter().cloned());
        }
        closed |= part.get("additionalProperties") == Some(&Value::Bool(false));
    }
    let mut object = json!({"type": "object", "properties": properties});
    if !required.is_empty() {
        object["required"] = Value::Array(required);
    }
    if closed {
        object["additionalProperties"] = Value::Bool(false);
    }
    if let Some(d) = schema.get("description") {
        object["description"] = d.clone();
    }
    object
}

/// The document as the committed file holds it: pretty JSON, ending with a newline.
pub fn document_text() -> String {
    let mut text = serde_json::to_string_pretty(&document()).unwrap_or_default();
    text.push('\n');
    text
}

/// `GET /v1/openapi.json`, no token needed; the document is built once.
pub fn router() -> Router {
    Router::new()
        .route(PATH, get(serve))
        .with_state(Bytes::from(document_text()))
}

/// This document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "platform",
    responses((status = 200, description = "the API document, OpenAPI 3.1", body = Object))
)]
async fn serve(State(doc): State<Bytes>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], doc).into_response()
}

fn bearer(description: &str) -> SecurityScheme {
    SecurityScheme::Http(
        HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(description))
            .build(),
    )
}

/// The three tokens: all bearer tokens in `Authorization`, told apart by their value.
fn add_security_schemes(doc: &mut utoipa::openapi::OpenApi) {
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "admin",
        bearer("the operator's token (`auth.admin_token`, `MYSIMBDP_ADMIN_TOKEN`)"),
    );
    components.add_security_scheme(
        "tenant",
        bearer("a tenant's token (`msb_…`), shown once when the tenant is created: it reaches that tenant's resources only"),
    );
    components.add_security_scheme(
        "internal",
        bearer("the components' token (`auth.internal_token`, `MYSIMBDP_INTERNAL_TOKEN`) in a split deployment"),
    );
}

/// Routes the edge serves outside the in-flight limits with handlers that cannot time out.
const TRIVIAL: &[&str] = &["/healthz", "/metrics", PATH];

const METHODS: &[&str] = &["get", "put", "post", "delete", "patch"];

/// Adds to each operation the answers the HTTP edge (`http`) gives on any route, where the
/// handler's own list lacks them: 400 for a path or query that does not parse, 401 for a
/// missing or invalid token, 408 for a body that arrives too slowly, 413 for a JSON body
/// over the limit, 429 for a tenant over its share of requests in flight, 503 for a busy,
/// timed-out or stopping server or a dependency down.
fn add_edge_responses(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in item.iter_mut() {
            if METHODS.contains(&method.as_str()) {
                add_edge_responses_to(path, op);
            }
        }
    }
}

fn add_edge_responses_to(path: &str, op: &mut Value) {
    let schemes = security_schemes(op);
    let has_params = op.get("parameters").is_some();
    let body_types: Vec<String> = op
        .pointer("/requestBody/content")
        .and_then(Value::as_object)
        .map(|c| c.keys().cloned().collect())
        .unwrap_or_default();
    let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
        return;
    };
    let caller = schemes.iter().any(|s| s == "tenant" || s == "admin")
        && !schemes.iter().any(|s| s == "internal");
    if has_params {
        add(
            responses,
            "400",
            "a path or query parameter that does not parse",
        );
    }
    if caller {
        add(responses, "401", "no bearer token, or an invalid one");
    }
    if !body_types.is_empty() {
        add(
            responses,
            "408",
            "the body arrived too slowly (`http.body_timeout_ms`, `http.body_min_rate`); the connection is closed",
        );
    }
    if body_types.iter().any(|t| t == "application/json") {
        add(responses, "413", "the body is over the size limit");
    }
    if schemes.iter().any(|s| s == "tenant") {
        add_retry(
            responses,
            "429",
            "the tenant has its share of requests in flight (`http.max_in_flight_per_tenant`); retry after `Retry-After`",
        );
    }
    if !TRIVIAL.contains(&path) {
        add_retry(
            responses,
            "503",
            "busy (no request slot within `http.queue_timeout_ms`), not answered within `http.request_timeout_ms`, stopping, or the database or broker is down; retry (after `Retry-After` when given)",
        );
    }
}

/// The names of the schemes an operation accepts.
fn security_schemes(op: &Value) -> Vec<String> {
    op.get("security")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .flat_map(|r| r.keys().cloned())
        .collect()
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    })
}

fn add(responses: &mut Map<String, Value>, status: &str, description: &str) {
    responses
        .entry(status)
        .or_insert_with(|| error_response(description));
}

fn add_retry(responses: &mut Map<String, Value>, status: &str, description: &str) {
    responses.entry(status).or_insert_with(|| {
        let mut r = error_response(description);
        r["headers"] = json!({
            "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
        });
        r
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operations(doc: &Value) -> Vec<(String, String, Value)> {
        let mut ops = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                if METHODS.contains(&method.as_str()) {
                    ops.push((method.clone(), path.clone(), op.clone()));
                }
            }
        }
        ops
    }

    #[test]
    fn every_error_answer_is_the_error_body_and_every_token_route_says_401() {
        let doc = document();
        let ops = operations(&doc);
        assert!(ops.len() >= 25, "{} operations", ops.len());
        for (method, path, op) in ops {
            let responses = op["responses"].as_object().expect("responses");
            for (status, r) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    assert_eq!(
                        r.pointer("/content/application~1json/schema/$ref"),
                        Some(&json!("#/components/schemas/ErrorBody")),
                        "{method} {path} {status}"
                    );
                }
            }
            let schemes = security_schemes(&op);
            if schemes.iter().any(|s| s == "tenant") {
                for status in ["401", "404", "429", "503"] {
                    assert!(
                        responses.contains_key(status),
                        "{method} {path} lacks {status}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_flattened_struct_is_one_object_with_every_part_s_fields() {
        let doc = document();
        let create = &doc["components"]["schemas"]["CreateTenant"];
        assert!(create.get("allOf").is_none(), "{create}");
        for field in [
            "name",
            "max_file_bytes",
            "app_limits",
            "description",
            "auto_ingest",
        ] {
            assert!(
                create["properties"].get(field).is_some(),
                "{field}: {create}"
            );
        }
        assert_eq!(create["required"], json!(["name"]));
        assert_eq!(create["additionalProperties"], json!(false));
    }

    #[test]
    fn the_committed_document_is_the_one_the_code_makes() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        let committed = std::fs::read_to_string(path).expect("docs/openapi.json is committed");
        assert!(
            committed == document_text(),
            "docs/openapi.json is not what the code describes: regenerate it with \
             `cargo run --bin mysimbdp -- openapi --out docs/openapi.json` and commit it"
        );
    }

    #[test]
    fn the_three_tokens_are_bearer_schemes() {
        let doc = document();
        for scheme in ["admin", "tenant", "internal"] {
            assert_eq!(
                doc["components"]["securitySchemes"][scheme]["scheme"], "bearer",
                "{scheme}"
            );
        }
    }

    #[test]
    fn byte_bodies_are_binary_strings_not_arrays_of_numbers() {
        let doc = document();
        let mut seen = 0;
        for (method, path, op) in operations(&doc) {
            if let Some(s) = op.pointer("/requestBody/content/application~1octet-stream/schema") {
                assert_eq!(
                    s,
                    &json!({"type": "string", "format": "binary"}),
                    "{method} {path}"
                );
                seen += 1;
            }
        }
        assert!(seen >= 2, "file upload and byte messages: {seen}");
    }

    #[test]
    fn unsigned_integers_say_their_bounds() {
        let doc = document();
        let patch = &doc["components"]["schemas"]["AdminPatch"]["properties"];
        assert_eq!(patch["max_staged_files"]["format"], "uint32");
        assert_eq!(patch["max_staged_files"]["maximum"], json!(u32::MAX));
        assert_eq!(patch["max_file_bytes"]["maximum"], json!(i64::MAX));
        assert_eq!(patch["max_file_bytes"]["minimum"], json!(0));
    }
}
