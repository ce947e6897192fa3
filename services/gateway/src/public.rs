//! Which methods the contracts mark public, read from the compiled descriptor set.
//!
//! prost's `prost-types` drops unknown fields, and the access rule is an extension
//! (`(tessera.mesh.v1.access)`, field 50001 of `MethodOptions`), so the few descriptor
//! messages on the way to it are mirrored here with only the fields we read.

use prost::Message;
use tessera::mesh::v1::AccessRule;

use crate::Error;

/// A method reachable through the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicMethod {
    /// The gRPC path, `/tessera.posts.v1.PostService/CreatePost`.
    pub path: String,
    /// The protobuf package, `tessera.posts.v1`.
    pub package: String,
    /// The fully qualified service, `tessera.posts.v1.PostService`.
    pub service: String,
    /// The method name, `CreatePost`.
    pub method: String,
    /// An end-user token is required.
    pub user: bool,
    /// The method streams its responses.
    pub server_streaming: bool,
    /// The method takes a stream of requests.
    pub client_streaming: bool,
}

#[derive(Clone, PartialEq, Message)]
struct FileDescriptorSet {
    #[prost(message, repeated, tag = "1")]
    file: Vec<FileDescriptorProto>,
}

#[derive(Clone, PartialEq, Message)]
struct FileDescriptorProto {
    #[prost(string, optional, tag = "2")]
    package: Option<String>,
    #[prost(message, repeated, tag = "6")]
    service: Vec<ServiceDescriptorProto>,
}

#[derive(Clone, PartialEq, Message)]
struct ServiceDescriptorProto {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(message, repeated, tag = "2")]
    method: Vec<MethodDescriptorProto>,
}

#[derive(Clone, PartialEq, Message)]
struct MethodDescriptorProto {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(message, optional, tag = "4")]
    options: Option<MethodOptions>,
    #[prost(bool, optional, tag = "5")]
    client_streaming: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    server_streaming: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
struct MethodOptions {
    #[prost(message, optional, tag = "50001")]
    access: Option<AccessRule>,
}

/// The public methods of every Tessera contract, in descriptor order.
pub fn public_methods() -> Result<Vec<PublicMethod>, Error> {
    public_methods_in(tessera::FILE_DESCRIPTOR_SET)
}

/// The public methods described by an encoded `google.protobuf.FileDescriptorSet`.
pub fn public_methods_in(descriptor_set: &[u8]) -> Result<Vec<PublicMethod>, Error> {
    let set = FileDescriptorSet::decode(descriptor_set)?;
    let mut out = Vec::new();
    for file in set.file {
        let package = file.package.unwrap_or_default();
        for service in file.service {
            let service_name = service.name.unwrap_or_default();
            let full = if package.is_empty() {
                service_name
            } else {
                format!("{package}.{service_name}")
            };
            for method in service.method {
                let Some(rule) = method.options.and_then(|o| o.access) else {
                    continue;
                };
                if !rule.public {
                    continue;
                }
                let name = method.name.unwrap_or_default();
                out.push(PublicMethod {
                    path: format!("/{full}/{name}"),
                    package: package.clone(),
                    service: full.clone(),
                    method: name,
                    user: rule.user,
                    server_streaming: method.server_streaming.unwrap_or(false),
                    client_streaming: method.client_streaming.unwrap_or(false),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_the_access_rules_from_the_contracts() {
        let methods = public_methods().unwrap();
        let find = |p: &str| methods.iter().find(|m| m.path == p);

        let create = find("/tessera.posts.v1.PostService/CreatePost").unwrap();
        assert!(create.user);
        assert_eq!(create.package, "tessera.posts.v1");
        assert_eq!(create.service, "tessera.posts.v1.PostService");
        assert_eq!(create.method, "CreatePost");
        assert!(!create.server_streaming);

        assert!(!find("/tessera.posts.v1.PostService/GetPost").unwrap().user);
        assert!(
            !find("/tessera.gateway.v1.FeedService/GetPostThread")
                .unwrap()
                .user
        );
        let sub =
            find("/tessera.notifications.v1.NotificationService/SubscribeNotifications").unwrap();
        assert!(sub.user && sub.server_streaming);

        // Not public: event streams are for services only.
        for svc in ["users", "posts", "comments"] {
            let cap = format!("{}{}", svc[..1].to_uppercase(), &svc[1..svc.len() - 1]);
            let path = format!("/tessera.{svc}.v1.{cap}Service/WatchEvents");
            assert!(find(&path).is_none(), "{path} must not be public");
        }
        // Every method exactly once.
        let mut paths: Vec<_> = methods.iter().map(|m| &m.path).collect();
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), methods.len());
    }

    #[test]
    fn garbage_descriptor_set_is_an_error() {
        assert!(matches!(
            public_methods_in(b"\xff\xff\xff"),
            Err(Error::Descriptor(_))
        ));
    }
}
