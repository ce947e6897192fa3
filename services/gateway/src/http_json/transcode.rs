//! JSON to protobuf and back: the request message from path variables, the query string and
//! the JSON body; the response (or the gRPC status) as canonical proto3 JSON.

use bytes::{Buf, Bytes};
use prost::Message as _;
use prost_reflect::{
    DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage, SerializeOptions,
    Value as PValue,
};
use serde_json::{Map, Value};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::rules::{Api, Binding, BodyRule, field_at};
use super::template::percent_decode;

/// The JSON the gateway writes: proto field names in lowerCamelCase, 64-bit integers as strings,
/// enums by name, default values left out (what grpcurl and Python's `json_format` print).
fn options() -> SerializeOptions {
    SerializeOptions::new()
}

fn bad_request(field: &str, description: impl Into<String>) -> Status {
    let description = description.into();
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {description}"),
        ErrorDetails::with_bad_request_violation(field, description),
    )
}

/// The encoded request message of `binding`.
pub fn request_message(
    binding: &Binding,
    vars: Vec<(Vec<String>, String)>,
    query: Option<&str>,
    body: &[u8],
) -> Result<Bytes, Status> {
    let input = binding.method.input();
    let parse_body = || -> Result<Option<Value>, Status> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        serde_json::from_slice(body)
            .map(Some)
            .map_err(|e| bad_request("body", format!("not valid JSON: {e}")))
    };
    let mut root = Value::Object(Map::new());
    match &binding.body {
        BodyRule::Whole => {
            if let Some(value) = parse_body()? {
                if !value.is_object() {
                    return Err(bad_request("body", "must be a JSON object"));
                }
                root = value;
            }
        }
        BodyRule::Field(field) => {
            if let Some(value) = parse_body()? {
                insert(&mut root, field, value);
            }
        }
        // Clients often send `{}` or nothing with GET and DELETE; there is nothing to fill.
        BodyRule::None => {}
    }
    let bound: Vec<String> = vars.iter().map(|(path, _)| path.join(".")).collect();
    for (path, value) in vars {
        set(&mut root, &input, &path, &value, false)
            .map_err(|e| bad_request(&path.join("."), e))?;
    }
    if !matches!(binding.body, BodyRule::Whole) {
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| percent_decode(&s.replace('+', " "));
            let (Some(key), Some(value)) = (decode(key), decode(value)) else {
                return Err(bad_request(pair, "malformed percent-encoding in the query"));
            };
            if bound.contains(&key) {
                // The path already says it; a second value in the query would be ambiguous.
                return Err(bad_request(
                    &key,
                    "is set by the path; leave it out of the query",
                ));
            }
            let path: Vec<String> = key.split('.').map(str::to_owned).collect();
            set(&mut root, &input, &path, &value, true).map_err(|e| bad_request(&key, e))?;
        }
    }
    let message = DynamicMessage::deserialize(input, root).map_err(|e| {
        let text = e.to_string();
        bad_request("body", text)
    })?;
    Ok(Bytes::from(message.encode_to_vec()))
}

/// Puts `value` under the field's JSON name, dropping a spelling by its proto name so the
/// parser does not see the field twice.
fn insert(object: &mut Value, field: &FieldDescriptor, value: Value) {
    if let Value::Object(map) = object {
        if field.name() != field.json_name() {
            map.remove(field.name());
        }
        map.insert(field.json_name().to_owned(), value);
    }
}

/// Sets the field at `path` from a path variable or query parameter; repeated fields collect
/// every value when `append`.
fn set(
    root: &mut Value,
    message: &MessageDescriptor,
    path: &[String],
    raw: &str,
    append: bool,
) -> Result<(), String> {
    let leaf = field_at(message, path)?;
    let mut current = message.clone();
    let mut node = root;
    for name in &path[..path.len() - 1] {
        let field = current
            .get_field_by_name(name)
            .or_else(|| current.get_field_by_json_name(name))
            .ok_or_else(|| format!("no field {name}"))?;
        let Kind::Message(next) = field.kind() else {
            return Err(format!("{name} is not a message"));
        };
        let Value::Object(map) = node else {
            return Err(format!("{name} is not an object"));
        };
        if field.name() != field.json_name()
            && let Some(v) = map.remove(field.name())
        {
            map.insert(field.json_name().to_owned(), v);
        }
        node = map
            .entry(field.json_name().to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        current = next;
    }
    if leaf.is_map() {
        return Err("map fields cannot be set from the path or query".into());
    }
    let value = scalar(&leaf.kind(), raw)?;
    let Value::Object(map) = node else {
        return Err("not an object".into());
    };
    if leaf.is_list() {
        if !append {
            return Err("a repeated field cannot be a path variable".into());
        }
        if let Some(v) = map.remove(leaf.name()) {
            map.insert(leaf.json_name().to_owned(), v);
        }
        match map.get_mut(leaf.json_name()) {
            Some(Value::Array(items)) => items.push(value),
            _ => {
                map.insert(leaf.json_name().to_owned(), Value::Array(vec![value]));
            }
        }
    } else {
        map.remove(leaf.name());
        map.insert(leaf.json_name().to_owned(), value);
    }
    Ok(())
}

/// A path or query string as the JSON value proto3 JSON expects for the field's type; the
/// parser then checks ranges and formats.
fn scalar(kind: &Kind, raw: &str) -> Result<Value, String> {
    Ok(match kind {
        Kind::Bool => match raw {
            "true" | "1" => Value::Bool(true),
            "false" | "0" => Value::Bool(false),
            _ => return Err(format!("expected true or false, got {raw:?}")),
        },
        Kind::Double | Kind::Float => match raw.parse::<f64>() {
            Ok(n) => {
                serde_json::Number::from_f64(n).map_or(Value::String(raw.into()), Value::Number)
            }
            Err(_) => Value::String(raw.into()),
        },
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::from(
            raw.parse::<i32>()
                .map_err(|e| format!("expected a 32-bit integer, got {raw:?}: {e}"))?,
        ),
        Kind::Uint32 | Kind::Fixed32 => Value::from(
            raw.parse::<u32>()
                .map_err(|e| format!("expected an unsigned 32-bit integer, got {raw:?}: {e}"))?,
        ),
        // 64-bit integers stay strings, as proto3 JSON writes them; checked here all the same.
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            raw.parse::<i64>()
                .map_err(|e| format!("expected a 64-bit integer, got {raw:?}: {e}"))?;
            Value::String(raw.into())
        }
        Kind::Uint64 | Kind::Fixed64 => {
            raw.parse::<u64>()
                .map_err(|e| format!("expected an unsigned 64-bit integer, got {raw:?}: {e}"))?;
            Value::String(raw.into())
        }
        Kind::Enum(_) => match raw.parse::<i64>() {
            Ok(n) => Value::from(n),
            Err(_) => Value::String(raw.into()),
        },
        Kind::Message(m)
            if m.full_name().starts_with("google.protobuf.")
                && m.full_name().ends_with("Value") =>
        {
            // Wrappers take their wrapped type's JSON.
            match m.get_field_by_name("value") {
                Some(inner) => scalar(&inner.kind(), raw)?,
                None => Value::String(raw.into()),
            }
        }
        // Integers as strings are valid proto3 JSON; so are Timestamp, Duration and FieldMask.
        _ => Value::String(raw.into()),
    })
}

/// The JSON of a decoded response (or of its `response_body` field), fields in contract order.
pub fn response_json(binding: &Binding, payload: &[u8]) -> Result<Vec<u8>, Status> {
    let message = DynamicMessage::decode(binding.method.output(), payload)
        .map_err(|e| Status::internal(format!("undecodable response: {e}")))?;
    let render = |e: &dyn std::fmt::Display| Status::internal(format!("cannot render: {e}"));
    if let Some(field) = &binding.response_body {
        let value = message.get_field(field).into_owned();
        return serde_json::to_vec(&value_json(&value, field)?).map_err(|e| render(&e));
    }
    // Straight to bytes rather than through `serde_json::Value`, whose map would sort the keys.
    let mut out = Vec::with_capacity(payload.len() * 2);
    message
        .serialize_with_options(&mut serde_json::Serializer::new(&mut out), &options())
        .map_err(|e| render(&e))?;
    Ok(out)
}

fn to_json(message: &DynamicMessage) -> Result<Value, Status> {
    message
        .serialize_with_options(serde_json::value::Serializer, &options())
        .map_err(|e| Status::internal(format!("cannot render the response: {e}")))
}

fn value_json(value: &PValue, field: &FieldDescriptor) -> Result<Value, Status> {
    // Wrap in a one-field message so the serializer applies the same rules, then unwrap.
    let mut holder = DynamicMessage::new(field.parent_message().clone());
    holder.set_field(field, value.clone());
    let mut json = to_json(&holder)?;
    Ok(json
        .as_object_mut()
        .and_then(|m| m.remove(field.json_name()))
        .unwrap_or(Value::Null))
}

/// The one gRPC message of a unary response body (5-byte prefix, then the message).
pub fn single_message(mut body: Bytes) -> Result<Bytes, Status> {
    if body.len() < 5 {
        return Err(Status::internal("the response has no message"));
    }
    let compressed = body.get_u8();
    let len = body.get_u32() as usize;
    if compressed != 0 {
        return Err(Status::internal(
            "compressed responses are not expected here",
        ));
    }
    if body.len() != len {
        return Err(Status::internal("the response is not one whole message"));
    }
    Ok(body)
}

/// The standard HTTP status for a gRPC code (as grpc-gateway and Google's APIs map them).
pub fn http_status(code: Code) -> http::StatusCode {
    use http::StatusCode as H;
    match code {
        Code::Ok => H::OK,
        Code::Cancelled => H::from_u16(499).unwrap_or(H::BAD_REQUEST),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => H::BAD_REQUEST,
        Code::DeadlineExceeded => H::GATEWAY_TIMEOUT,
        Code::NotFound => H::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => H::CONFLICT,
        Code::PermissionDenied => H::FORBIDDEN,
        Code::Unauthenticated => H::UNAUTHORIZED,
        Code::ResourceExhausted => H::TOO_MANY_REQUESTS,
        Code::Unimplemented => H::NOT_IMPLEMENTED,
        Code::Unavailable => H::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => H::INTERNAL_SERVER_ERROR,
    }
}

/// `{code, message, details}` for a status: the JSON form of `google.rpc.Status`, details
/// (field violations and the like) rendered by their `@type` when known.
pub fn error_json(api: &Api, status: &Status) -> Value {
    let mut details = Vec::new();
    if !status.details().is_empty()
        && let Some(desc) = api.status_descriptor()
        && let Ok(rpc_status) = DynamicMessage::decode(desc, status.details())
        && let Some(field) = rpc_status.descriptor().get_field_by_name("details")
        && let PValue::List(items) = rpc_status.get_field(&field).into_owned()
    {
        for item in items {
            let PValue::Message(any) = item else { continue };
            details.push(any_json(&any));
        }
    }
    serde_json::json!({
        "code": status.code() as i32,
        "message": status.message(),
        "details": details,
    })
}

/// An `Any` as `{"@type": ..., fields...}`; a type this gateway does not know keeps its
/// bytes in base64 under `value`, as proto3 JSON has no other way to show it.
fn any_json(any: &DynamicMessage) -> Value {
    if let Ok(v) = any.serialize_with_options(serde_json::value::Serializer, &options()) {
        return v;
    }
    let field = |name: &str| {
        any.descriptor()
            .get_field_by_name(name)
            .map(|f| any.get_field(&f).into_owned())
    };
    let type_url = match field("type_url") {
        Some(PValue::String(s)) => s,
        _ => String::new(),
    };
    let value = match field("value") {
        Some(PValue::Bytes(b)) => base64_encode(&b),
        _ => String::new(),
    };
    serde_json::json!({"@type": type_url, "value": value})
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use http::Method;
    use prost::Message as _;
    use tessera::posts::v1::{ListPostsRequest, Post, UpdatePostRequest};

    use super::super::rules::Lookup;
    use super::*;

    fn found<'a>(api: &'a Api, m: Method, path: &str) -> (&'a Binding, Vec<(Vec<String>, String)>) {
        match api.find(&m, path) {
            Lookup::Found(b, vars) => (b, vars),
            _ => panic!("no binding for {m} {path}"),
        }
    }

    #[test]
    fn path_query_and_body_fill_the_request() {
        let api = Api::contracts().unwrap();
        let (b, vars) = found(&api, Method::PATCH, "/v1/posts/p%201");
        let bytes = request_message(
            b,
            vars,
            Some("updateMask=title,body&etag=e1"),
            br#"{"title":"T","post_id":"ignored"}"#,
        )
        .unwrap();
        let req = UpdatePostRequest::decode(bytes).unwrap();
        let post = req.post.unwrap();
        assert_eq!(post.post_id, "p 1");
        assert_eq!(post.title, "T");
        assert_eq!(req.etag, "e1");
        assert_eq!(req.update_mask.unwrap().paths, ["title", "body"]);

        let (b, vars) = found(&api, Method::GET, "/v1/posts");
        let bytes = request_message(
            b,
            vars,
            Some("page_size=5&authorId=u%2B1&pageToken=a+b"),
            b"",
        )
        .unwrap();
        let req = ListPostsRequest::decode(bytes).unwrap();
        assert_eq!(req.page_size, 5);
        assert_eq!(req.author_id, "u+1");
        assert_eq!(req.page_token, "a b");
    }

    #[test]
    fn bad_inputs_are_invalid_argument_with_the_field() {
        let api = Api::contracts().unwrap();
        let (b, _) = found(&api, Method::GET, "/v1/posts");
        for (query, field) in [
            ("page_size=ten", "page_size"),
            ("nope=1", "nope"),
            ("pageSize=99999999999", "pageSize"),
            ("x=%zz", "x=%zz"),
        ] {
            let err = request_message(b, vec![], Some(query), b"").unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{query}");
            let violations = err.get_error_details().bad_request().unwrap().clone();
            assert_eq!(violations.field_violations.len(), 1, "{query}");
            assert_eq!(violations.field_violations[0].field, field, "{query}");
        }
        let (b, _) = found(&api, Method::POST, "/v1/posts");
        for body in [
            &b"{"[..],
            b"[1]",
            br#"{"title": 5}"#,
            br#"{"unknownField": 1}"#,
        ] {
            let err = request_message(b, vec![], None, body).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
        }
    }

    #[test]
    fn hostile_inputs_are_errors_not_panics() {
        let api = Api::contracts().unwrap();
        let (b, _) = found(&api, Method::POST, "/v1/posts");
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let nested = format!("{}1{}", r#"{"a":"#.repeat(5_000), "}".repeat(5_000));
        for body in [
            deep.as_bytes(),
            nested.as_bytes(),
            b"\xff\xfe",
            b"null",
            b"{\"tags\": {}}",
        ] {
            let err = request_message(b, vec![], None, body).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
        }
        let (b, _) = found(&api, Method::GET, "/v1/users:batchGet");
        let many = vec!["userIds=x"; 10_000].join("&");
        let bytes = request_message(b, vec![], Some(&many), b"").unwrap();
        let req = tessera::users::v1::BatchGetUsersRequest::decode(bytes).unwrap();
        assert_eq!(req.user_ids.len(), 10_000);
        for query in ["=", "&&&", "a.b.c.d=1", "pageToken.x=1", "%=1"] {
            let (b, _) = found(&api, Method::GET, "/v1/posts");
            let _ = request_message(b, vec![], Some(query), b"");
        }
    }

    #[test]
    fn responses_are_canonical_proto3_json() {
        let api = Api::contracts().unwrap();
        let (b, _) = found(&api, Method::GET, "/v1/posts/x");
        let post = Post {
            post_id: "p1".into(),
            title: "Hi".into(),
            create_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            ..Default::default()
        };
        let resp = tessera::posts::v1::GetPostResponse { post: Some(post) };
        let bytes = response_json(b, &resp.encode_to_vec()).unwrap();
        // Fields in the contract's order, as grpcurl prints them.
        assert!(
            std::str::from_utf8(&bytes)
                .unwrap()
                .starts_with(r#"{"post":{"postId":"p1","title":"Hi","#)
        );
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"post": {"postId": "p1", "title": "Hi", "createTime": "2023-11-14T22:13:20Z"}})
        );
        let (b, _) = found(&api, Method::POST, "/v1/notifications:markRead");
        let resp = tessera::notifications::v1::MarkNotificationsReadResponse { unread_count: 7 };
        let json: Value =
            serde_json::from_slice(&response_json(b, &resp.encode_to_vec()).unwrap()).unwrap();
        assert_eq!(json, serde_json::json!({"unreadCount": "7"}));
    }

    #[test]
    fn errors_carry_code_message_and_field_violations() {
        let api = Api::contracts().unwrap();
        let status = bad_request("title", "must not be empty");
        let json = error_json(&api, &status);
        assert_eq!(json["code"], 3);
        assert_eq!(
            json["details"][0]["@type"],
            "type.googleapis.com/google.rpc.BadRequest"
        );
        assert_eq!(json["details"][0]["fieldViolations"][0]["field"], "title");
        assert_eq!(http_status(Code::Aborted), http::StatusCode::CONFLICT);
        assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
    }
}
