//! The OpenAPI 3 document of the HTTP/JSON API, generated from the same bindings the
//! transcoder serves, with schemas for the proto3 JSON of every message they use.

use std::collections::BTreeMap;

use prost_reflect::{FieldDescriptor, FileDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use super::rules::{Api, Binding, BodyRule};

/// The document as JSON.
pub fn document(api: &Api) -> Value {
    let mut schemas: BTreeMap<String, Value> = BTreeMap::new();
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for b in api.bindings() {
        let op = operation(b, &mut schemas);
        paths
            .entry(b.template.openapi_path())
            .or_default()
            .insert(b.http_method.as_str().to_ascii_lowercase(), op);
    }
    schemas.insert(
        "Status".into(),
        json!({
            "type": "object",
            "description": "An error: the gRPC status code, a message, and details such as google.rpc.BadRequest field violations.",
            "properties": {
                "code": {"type": "integer", "format": "int32"},
                "message": {"type": "string"},
                "details": {"type": "array", "items": {
                    "type": "object",
                    "properties": {"@type": {"type": "string"}},
                    "additionalProperties": true
                }}
            }
        }),
    );
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Tessera public API",
            "version": "v1",
            "description": "The public methods of Tessera's gRPC contracts over HTTP/JSON, from their google.api.http annotations. Bodies are canonical proto3 JSON; errors are google.rpc.Status as JSON with the standard HTTP status for the gRPC code."
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            }
        }
    })
}

fn operation(b: &Binding, schemas: &mut BTreeMap<String, Value>) -> Value {
    let input = b.method.input();
    let mut parameters = Vec::new();
    let bound: Vec<String> = b.template.variables().map(|p| p.join(".")).collect();
    for path in &bound {
        parameters.push(json!({
            "name": path,
            "in": "path",
            "required": true,
            "schema": {"type": "string"},
        }));
    }
    match &b.body {
        BodyRule::Whole => {}
        BodyRule::Field(f) => {
            query_parameters(&input, "", &bound, Some(f.name()), &mut parameters, 0);
        }
        BodyRule::None => {
            query_parameters(&input, "", &bound, None, &mut parameters, 0);
        }
    }
    let name = format!("{}_{}", b.method.parent_service().name(), b.method.name());
    let output_schema = match &b.response_body {
        Some(f) => field_schema(f, schemas),
        None => schema_ref(&b.method.output(), schemas),
    };
    let mut op = json!({
        "operationId": name,
        "summary": format!("{} ({})", b.method.full_name(), b.grpc_path),
        "tags": [b.method.parent_service().name()],
        "parameters": parameters,
        "responses": {
            "200": {
                "description": "OK",
                "content": {"application/json": {"schema": output_schema}}
            },
            "default": {
                "description": "An error",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Status"}}}
            }
        }
    });
    let request_schema = match &b.body {
        BodyRule::Whole => Some(schema_ref(&input, schemas)),
        BodyRule::Field(f) => Some(field_schema(f, schemas)),
        BodyRule::None => None,
    };
    if let Some(schema) = request_schema {
        op["requestBody"] = json!({
            "required": true,
            "content": {"application/json": {"schema": schema}}
        });
    }
    if let Some(text) = comment(&b.method.parent_file(), b.method.path()) {
        op["description"] = Value::String(text);
    }
    if b.user {
        op["security"] = json!([{"bearer": []}]);
    }
    if b.method.is_server_streaming() {
        // One response message per line, as it comes; a failure ends it with {"error": ...}.
        let schema = op["responses"]["200"]["content"]["application/json"].take();
        op["responses"]["200"] = json!({
            "description": "A stream: one JSON response message per line; a failure ends it with a line {\"error\": Status}.",
            "content": {"application/x-ndjson": schema},
        });
    }
    op
}

/// Query parameters: the scalar and repeated-scalar fields not bound by the path or body,
/// nested messages by dotted names (a few levels deep).
fn query_parameters(
    message: &MessageDescriptor,
    prefix: &str,
    bound: &[String],
    body: Option<&str>,
    out: &mut Vec<Value>,
    depth: usize,
) {
    for field in message.fields() {
        let name = format!("{prefix}{}", field.name());
        if bound.contains(&name) || body == Some(name.as_str()) || field.is_map() {
            continue;
        }
        match field.kind() {
            Kind::Message(m) if !is_well_known(&m) => {
                if depth < 3 && !field.is_list() {
                    query_parameters(&m, &format!("{name}."), bound, body, out, depth + 1);
                }
            }
            _ => {
                let scalar = scalar_schema(&field.kind());
                let schema = if field.is_list() {
                    json!({"type": "array", "items": scalar})
                } else {
                    scalar
                };
                out.push(json!({
                    "name": name,
                    "in": "query",
                    "required": false,
                    "schema": schema,
                }));
            }
        }
    }
}

/// The leading comment of the element at `path` in its file, if the contract has one.
fn comment(file: &FileDescriptor, path: &[i32]) -> Option<String> {
    let info = file.file_descriptor_proto().source_code_info.as_ref()?;
    let text = info
        .location
        .iter()
        .find(|l| l.path == path)?
        .leading_comments
        .as_deref()?
        .trim();
    (!text.is_empty()).then(|| text.to_owned())
}

fn is_well_known(m: &MessageDescriptor) -> bool {
    m.full_name().starts_with("google.protobuf.")
}

fn schema_name(m: &MessageDescriptor) -> String {
    m.full_name().to_owned()
}

fn schema_ref(m: &MessageDescriptor, schemas: &mut BTreeMap<String, Value>) -> Value {
    if is_well_known(m) {
        return well_known(m);
    }
    let name = schema_name(m);
    if !schemas.contains_key(&name) {
        // Placeholder first, so recursive messages terminate.
        schemas.insert(name.clone(), Value::Null);
        let mut properties = Map::new();
        for field in m.fields() {
            let mut schema = field_schema(&field, schemas);
            if let Some(text) = comment(&field.parent_file(), field.path()) {
                // OpenAPI 3.0 ignores siblings of $ref; wrap it to keep the description.
                if schema.get("$ref").is_some() {
                    schema = json!({"allOf": [schema]});
                }
                schema["description"] = Value::String(text);
            }
            properties.insert(field.json_name().to_owned(), schema);
        }
        let mut schema = json!({"type": "object", "properties": properties});
        if let Some(text) = comment(&m.parent_file(), m.path()) {
            schema["description"] = Value::String(text);
        }
        schemas.insert(name.clone(), schema);
    }
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn field_schema(field: &FieldDescriptor, schemas: &mut BTreeMap<String, Value>) -> Value {
    let one = |kind: &Kind, schemas: &mut BTreeMap<String, Value>| match kind {
        Kind::Message(m) => schema_ref(m, schemas),
        other => scalar_schema(other),
    };
    if field.is_map() {
        if let Kind::Message(entry) = field.kind()
            && let Some(value) = entry.get_field_by_name("value")
        {
            return json!({"type": "object", "additionalProperties": one(&value.kind(), schemas)});
        }
        return json!({"type": "object"});
    }
    let item = one(&field.kind(), schemas);
    if field.is_list() {
        json!({"type": "array", "items": item})
    } else {
        item
    }
}

fn scalar_schema(kind: &Kind) -> Value {
    match kind {
        Kind::Double => json!({"type": "number", "format": "double"}),
        Kind::Float => json!({"type": "number", "format": "float"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({"type": "integer", "format": "int32"})
        }
        Kind::Uint32 | Kind::Fixed32 => json!({"type": "integer", "format": "int64", "minimum": 0}),
        // proto3 JSON writes 64-bit integers as strings.
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => json!({"type": "string", "format": "int64"}),
        Kind::Uint64 | Kind::Fixed64 => json!({"type": "string", "format": "uint64"}),
        Kind::Bool => json!({"type": "boolean"}),
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "format": "byte"}),
        Kind::Enum(e) => {
            let names: Vec<String> = e.values().map(|v| v.name().to_owned()).collect();
            json!({"type": "string", "enum": names})
        }
        Kind::Message(m) => well_known(m),
    }
}

fn well_known(m: &MessageDescriptor) -> Value {
    match m.full_name() {
        "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
        "google.protobuf.Duration" => json!({"type": "string", "example": "1.5s"}),
        "google.protobuf.FieldMask" => {
            json!({"type": "string", "description": "comma-separated lowerCamelCase field paths"})
        }
        "google.protobuf.Empty" => json!({"type": "object"}),
        name if name.ends_with("Value") && name != "google.protobuf.Value" => {
            match m.get_field_by_name("value") {
                Some(f) => scalar_schema(&f.kind()),
                None => json!({}),
            }
        }
        _ => json!({}),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::public::public_methods;

    #[test]
    fn every_public_method_has_a_path() {
        let api = Api::contracts().unwrap();
        let doc = document(&api);
        let mut summaries = Vec::new();
        for (_, ops) in doc["paths"].as_object().unwrap() {
            for (_, op) in ops.as_object().unwrap() {
                summaries.push(op["summary"].as_str().unwrap().to_owned());
            }
        }
        let missing: Vec<String> = public_methods()
            .unwrap()
            .into_iter()
            .map(|m| m.path)
            .filter(|path| !summaries.iter().any(|s| s.ends_with(&format!("({path})"))))
            .collect();
        assert!(
            missing.is_empty(),
            "public methods without a google.api.http path: {missing:?}"
        );
    }

    #[test]
    fn schemas_follow_proto3_json() {
        let api = Api::contracts().unwrap();
        let doc = document(&api);
        let post = &doc["components"]["schemas"]["tessera.posts.v1.Post"]["properties"];
        assert_eq!(post["postId"]["type"], "string");
        assert_eq!(post["createTime"]["format"], "date-time");
        assert_eq!(post["tags"]["type"], "array");
        let create = &doc["paths"]["/v1/posts"]["post"];
        assert_eq!(create["security"][0]["bearer"], json!([]));
        let update = &doc["paths"]["/v1/posts/{post.post_id}"]["patch"];
        let names: Vec<&str> = update["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"post.post_id"));
        assert!(names.contains(&"update_mask"));
        assert!(names.contains(&"etag"));
        let subscribe = &doc["paths"]["/v1/notifications:subscribe"]["get"]["responses"]["200"];
        assert!(subscribe["content"]["application/x-ndjson"]["schema"]["$ref"].is_string());
        assert!(!names.iter().any(|n| n.starts_with("post.title")));
        // The contracts' comments become descriptions.
        assert_eq!(
            update["description"],
            "Updates the fields named in update_mask; the etag must match the stored one."
        );
        assert!(
            post["etag"]["description"]
                .as_str()
                .unwrap()
                .contains("Changes on every update")
        );
    }
}
