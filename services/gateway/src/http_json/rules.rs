//! The HTTP bindings of the public methods, read from the `google.api.http` options in the
//! descriptor set: the one place the transcoder and the OpenAPI document learn routes from.

use http::Method;
use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor};
use tessera::google::api::{HttpRule, http_rule::Pattern};

use super::template::Template;
use crate::{Error, public::public_methods_in};

/// Where a request's HTTP body goes.
#[derive(Clone, Debug)]
pub enum BodyRule {
    /// No body: every field not in the path comes from the query string.
    None,
    /// `body: "*"`: the body is the whole request message (fields in the path override it).
    Whole,
    /// `body: "post"`: the body fills one field; the rest come from the path and query.
    Field(FieldDescriptor),
}

/// One HTTP binding of a public method.
#[derive(Clone, Debug)]
pub struct Binding {
    /// The gRPC method a matching request becomes.
    pub method: MethodDescriptor,
    /// `/tessera.posts.v1.PostService/CreatePost`.
    pub grpc_path: String,
    /// The HTTP method it answers.
    pub http_method: Method,
    /// The path it answers; its variables fill request fields.
    pub template: Template,
    /// Where the HTTP body goes in the request message.
    pub body: BodyRule,
    /// `response_body`: only this field of the response is returned.
    pub response_body: Option<FieldDescriptor>,
    /// The access rule wants an end-user token.
    pub user: bool,
}

/// What a request's method and path found.
pub enum Lookup<'a> {
    /// The binding, with each path variable's field path and decoded value.
    Found(&'a Binding, Vec<(Vec<String>, String)>),
    /// The path has bindings, none for this HTTP method.
    WrongMethod(Vec<Method>),
    /// No binding's path matches.
    NotFound,
}

/// Every HTTP binding of the public methods, plus the descriptors to encode and decode them.
#[derive(Debug)]
pub struct Api {
    pool: DescriptorPool,
    bindings: Vec<Binding>,
}

impl Api {
    /// The bindings of Tessera's own contracts.
    pub fn contracts() -> Result<Self, Error> {
        Self::from_descriptor_set(tessera::FILE_DESCRIPTOR_SET)
    }

    /// The bindings of the public methods in an encoded `FileDescriptorSet`; errors name a
    /// rule that cannot be served (a contract defect, so `serve` fails at start).
    pub fn from_descriptor_set(bytes: &[u8]) -> Result<Self, Error> {
        let rule_err = |e: &dyn std::fmt::Display| Error::HttpRule(e.to_string());
        let mut pool = DescriptorPool::decode(bytes).map_err(|e| rule_err(&e))?;
        // google.rpc.Status and its details, to render error details as JSON.
        pool.decode_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .map_err(|e| rule_err(&e))?;
        let http_ext = pool.get_extension_by_name("google.api.http");
        let mut bindings = Vec::new();
        for public in public_methods_in(bytes)? {
            let method = pool
                .get_service_by_name(&public.service)
                .and_then(|s| s.methods().find(|m| m.name() == public.method))
                .ok_or_else(|| Error::HttpRule(format!("{} not found", public.path)))?;
            let Some(ext) = &http_ext else { continue };
            let options = method.options();
            if !options.has_extension(ext) {
                continue;
            }
            let rule: HttpRule = options
                .get_extension(ext)
                .as_message()
                .ok_or_else(|| Error::HttpRule(format!("{}: not a message", public.path)))?
                .transcode_to()
                .map_err(|e| Error::HttpRule(format!("{}: {e}", public.path)))?;
            let mut rules = vec![rule.clone()];
            rules.extend(rule.additional_bindings.iter().cloned());
            for rule in rules {
                bindings.push(
                    binding(&method, &public.path, public.user, &rule)
                        .map_err(|e| Error::HttpRule(format!("{}: {e}", public.path)))?,
                );
            }
        }
        Ok(Self { pool, bindings })
    }

    /// Every binding, additional ones included (the OpenAPI document lists them).
    pub fn bindings(&self) -> &[Binding] {
        &self.bindings
    }

    /// The contracts' descriptors and `google.rpc`'s, to encode and decode messages by name.
    pub fn pool(&self) -> &DescriptorPool {
        &self.pool
    }

    /// `google.rpc.Status`, for error bodies.
    pub fn status_descriptor(&self) -> Option<MessageDescriptor> {
        self.pool.get_message_by_name("google.rpc.Status")
    }

    /// The binding for a request's method and path (as sent, percent-encoded).
    pub fn find(&self, method: &Method, path: &str) -> Lookup<'_> {
        let mut allowed = Vec::new();
        for b in &self.bindings {
            if let Some(vars) = b.template.matches(path) {
                if b.http_method == method {
                    return Lookup::Found(b, vars);
                }
                allowed.push(b.http_method.clone());
            }
        }
        if allowed.is_empty() {
            Lookup::NotFound
        } else {
            Lookup::WrongMethod(allowed)
        }
    }
}

fn binding(
    method: &MethodDescriptor,
    grpc_path: &str,
    user: bool,
    rule: &HttpRule,
) -> Result<Binding, String> {
    let (http_method, template) = match &rule.pattern {
        Some(Pattern::Get(t)) => (Method::GET, t),
        Some(Pattern::Put(t)) => (Method::PUT, t),
        Some(Pattern::Post(t)) => (Method::POST, t),
        Some(Pattern::Delete(t)) => (Method::DELETE, t),
        Some(Pattern::Patch(t)) => (Method::PATCH, t),
        Some(Pattern::Custom(c)) => (
            Method::from_bytes(c.kind.as_bytes()).map_err(|e| e.to_string())?,
            &c.path,
        ),
        None => return Err("the rule has no HTTP method".into()),
    };
    let template = Template::parse(template).map_err(|e| e.to_string())?;
    let input = method.input();
    for path in template.variables() {
        let field = field_at(&input, path)?;
        if field.is_list() || field.is_map() || matches!(field.kind(), Kind::Message(_)) {
            return Err(format!(
                "path variable {} must be a singular scalar field",
                path.join(".")
            ));
        }
    }
    let body = match rule.body.as_str() {
        "" => BodyRule::None,
        "*" => BodyRule::Whole,
        name => BodyRule::Field(
            input
                .get_field_by_name(name)
                .ok_or_else(|| format!("body field {name:?} not in {}", input.full_name()))?,
        ),
    };
    let response_body = match rule.response_body.as_str() {
        "" => None,
        name => Some(method.output().get_field_by_name(name).ok_or_else(|| {
            format!(
                "response_body {name:?} not in {}",
                method.output().full_name()
            )
        })?),
    };
    Ok(Binding {
        method: method.clone(),
        grpc_path: grpc_path.to_owned(),
        http_method,
        template,
        body,
        response_body,
        user,
    })
}

/// The field a dotted path names, through singular message fields.
pub fn field_at(message: &MessageDescriptor, path: &[String]) -> Result<FieldDescriptor, String> {
    let mut current = message.clone();
    let mut found = None;
    for (i, name) in path.iter().enumerate() {
        let field = current
            .get_field_by_name(name)
            .or_else(|| current.get_field_by_json_name(name))
            .ok_or_else(|| format!("no field {:?} in {}", path.join("."), message.full_name()))?;
        if i + 1 < path.len() {
            match field.kind() {
                Kind::Message(m) if !field.is_list() && !field.is_map() => current = m,
                _ => return Err(format!("{name} in {:?} is not a message", path.join("."))),
            }
        }
        found = Some(field);
    }
    found.ok_or_else(|| "empty field path".to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_contracts_bind_resource_oriented_paths() {
        let api = Api::contracts().unwrap();
        let find = |m: Method, p: &str| match api.find(&m, p) {
            Lookup::Found(b, vars) => Some((b.grpc_path.clone(), vars)),
            _ => None,
        };
        assert_eq!(
            find(Method::POST, "/v1/posts").unwrap().0,
            "/tessera.posts.v1.PostService/CreatePost"
        );
        let (path, vars) = find(Method::PATCH, "/v1/posts/p1").unwrap();
        assert_eq!(path, "/tessera.posts.v1.PostService/UpdatePost");
        assert_eq!(
            vars,
            vec![(vec!["post".into(), "post_id".into()], "p1".into())]
        );
        assert_eq!(
            find(Method::GET, "/v1/posts/p1/thread").unwrap().0,
            "/tessera.gateway.v1.FeedService/GetPostThread"
        );
        assert_eq!(
            find(Method::GET, "/v1/users:batchGet").unwrap().0,
            "/tessera.users.v1.UserService/BatchGetUsers"
        );
        assert!(matches!(
            api.find(&Method::PUT, "/v1/posts/p1"),
            Lookup::WrongMethod(_)
        ));
        assert!(matches!(
            api.find(&Method::GET, "/v1/nothing"),
            Lookup::NotFound
        ));
        // Only public methods are bound: event streams stay internal.
        assert!(
            api.bindings()
                .iter()
                .all(|b| !b.grpc_path.ends_with("/WatchEvents"))
        );
        let update = api
            .bindings()
            .iter()
            .find(|b| b.grpc_path.ends_with("/UpdatePost"))
            .unwrap();
        assert!(matches!(&update.body, BodyRule::Field(f) if f.name() == "post"));
        assert!(update.user);
    }
}
