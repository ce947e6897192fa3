//! The contracts as the platform reads them: every method of the compiled descriptor set
//! with its streaming kinds, idempotency, access rule, public flag and leading comment.
//!
//! This is the one place the descriptor set is decoded. The access rules
//! ([`crate::policy`]), the reflection filter ([`crate::reflection`]), the gateway's public
//! routes and the client's retry table all ask [`Contracts`].

use std::{
    collections::{BTreeSet, HashMap},
    sync::OnceLock,
};

use prost::Message;
use tessera::mesh::v1::AccessRule;

// prost-types drops unknown fields, so its `MethodOptions` loses the access rule (an
// extension). These mirrors decode the path to it, with the extension as an ordinary field at
// its number; everything else comes from prost-types' full decoding of the same bytes.
#[derive(Clone, PartialEq, Message)]
struct FileSet {
    #[prost(message, repeated, tag = "1")]
    file: Vec<File>,
}

/// A set whose files stay encoded, so sets can be merged without losing what prost-types
/// would drop (the access rules).
#[derive(Clone, PartialEq, Message)]
struct RawSet {
    #[prost(bytes = "vec", repeated, tag = "1")]
    file: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
struct File {
    #[prost(message, repeated, tag = "6")]
    service: Vec<ServiceDesc>,
}

#[derive(Clone, PartialEq, Message)]
struct ServiceDesc {
    #[prost(message, repeated, tag = "2")]
    method: Vec<MethodDesc>,
}

#[derive(Clone, PartialEq, Message)]
struct MethodDesc {
    #[prost(message, optional, tag = "4")]
    options: Option<MethodOpts>,
}

#[derive(Clone, PartialEq, Message)]
struct MethodOpts {
    #[prost(message, optional, tag = "50001")]
    access: Option<AccessRule>,
}

/// Field numbers in descriptor.proto: `FileDescriptorProto.service` and
/// `ServiceDescriptorProto.method`, the steps of a method's source-location path.
pub(crate) const SERVICE_FIELD: i32 = 6;
pub(crate) const METHOD_FIELD: i32 = 2;

/// What the contract says about one method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Method {
    /// `/tessera.posts.v1.PostService/CreatePost`
    pub path: String,
    /// `tessera.posts.v1`
    pub package: String,
    /// `tessera.posts.v1.PostService`
    pub service: String,
    /// `CreatePost`
    pub method: String,
    /// The workload that serves it: the second package segment (`posts`).
    pub owner: String,
    /// Workload names allowed to call it on the internal port.
    pub callers: BTreeSet<String>,
    /// Served through the gateway's public port.
    pub public: bool,
    /// An end-user token is required.
    pub user: bool,
    /// `NO_SIDE_EFFECTS` or `IDEMPOTENT`: safe to retry.
    pub idempotent: bool,
    /// The method carries an access rule at all (without one only the owner may call it).
    pub has_rule: bool,
    /// The request is a stream of messages.
    pub client_streaming: bool,
    /// The response is a stream of messages.
    pub server_streaming: bool,
    /// The method's leading comment in the `.proto` file, empty without one.
    pub comment: String,
}

/// Every method of a descriptor set, in descriptor order, plus the set itself.
#[derive(Clone, Debug, Default)]
pub struct Contracts {
    methods: Vec<Method>,
    by_path: HashMap<String, usize>,
    descriptors: prost_types::FileDescriptorSet,
    encoded: std::sync::Arc<[u8]>,
}

/// The owning workload of a package `tessera.<name>.v1`.
fn owner_of(package: &str) -> String {
    package.split('.').nth(1).unwrap_or(package).to_owned()
}

impl Contracts {
    /// Tessera's own contracts, decoded once per process. The set is produced by build.rs
    /// from the same protos the code is generated from, so an error is a build defect.
    pub fn tessera() -> Result<&'static Self, prost::DecodeError> {
        static CONTRACTS: OnceLock<Result<Contracts, prost::DecodeError>> = OnceLock::new();
        CONTRACTS
            .get_or_init(|| Self::from_descriptor_set(tessera::FILE_DESCRIPTOR_SET))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Decodes a serialized `google.protobuf.FileDescriptorSet`.
    pub fn from_descriptor_set(bytes: &[u8]) -> Result<Self, prost::DecodeError> {
        Self::from_descriptor_sets(&[bytes])
    }

    /// Tessera's own contracts plus those of services compiled in their own crates (each
    /// crate's `FILE_DESCRIPTOR_SET`), as one.
    ///
    /// A service outside this repository's `proto/` compiles its contract itself, importing
    /// the mesh options (and whatever messages it reuses) from here; its set then holds those
    /// imports too. A file is taken once, from the first set that has it, by its name.
    ///
    /// ```
    /// use tessera_mesh::contracts::Contracts;
    ///
    /// // The same set twice is the set once.
    /// let twice = Contracts::from_descriptor_sets(&[tessera::FILE_DESCRIPTOR_SET; 2]).unwrap();
    /// let once = Contracts::tessera().unwrap();
    /// assert_eq!(twice.methods().count(), once.methods().count());
    /// assert!(twice.method("/tessera.posts.v1.PostService/GetPost").is_some());
    /// ```
    pub fn from_descriptor_sets(sets: &[&[u8]]) -> Result<Self, prost::DecodeError> {
        let mut seen = std::collections::HashSet::new();
        let mut merged = RawSet::default();
        for set in sets {
            for file in RawSet::decode(*set)?.file {
                let name = prost_types::FileDescriptorProto::decode(file.as_slice())?
                    .name
                    .unwrap_or_default();
                if seen.insert(name) {
                    merged.file.push(file);
                }
            }
        }
        let bytes = merged.encode_to_vec();
        let descriptors = prost_types::FileDescriptorSet::decode(bytes.as_slice())?;
        let rules = FileSet::decode(bytes.as_slice())?;
        let mut methods = Vec::new();
        for (file, file_rules) in descriptors.file.iter().zip(&rules.file) {
            let package = file.package();
            let comments = method_comments(file);
            for (s, (svc, svc_rules)) in file.service.iter().zip(&file_rules.service).enumerate() {
                let service = if package.is_empty() {
                    svc.name().to_owned()
                } else {
                    format!("{package}.{}", svc.name())
                };
                for (m, (method, method_rules)) in
                    svc.method.iter().zip(&svc_rules.method).enumerate()
                {
                    let access = method_rules.options.as_ref().and_then(|o| o.access.clone());
                    let has_rule = access.is_some();
                    let rule = access.unwrap_or_default();
                    // descriptor.proto: NO_SIDE_EFFECTS = 1, IDEMPOTENT = 2.
                    let idempotent = method
                        .options
                        .as_ref()
                        .is_some_and(|o| matches!(o.idempotency_level, Some(1 | 2)));
                    methods.push(Method {
                        path: format!("/{service}/{}", method.name()),
                        package: package.to_owned(),
                        service: service.clone(),
                        method: method.name().to_owned(),
                        owner: owner_of(package),
                        callers: rule.callers.into_iter().collect(),
                        public: rule.public,
                        user: rule.user,
                        idempotent,
                        has_rule,
                        client_streaming: method.client_streaming(),
                        server_streaming: method.server_streaming(),
                        comment: comments.get(&(s, m)).cloned().unwrap_or_default(),
                    });
                }
            }
        }
        let by_path = methods
            .iter()
            .enumerate()
            .map(|(i, m)| (m.path.clone(), i))
            .collect();
        Ok(Self {
            methods,
            by_path,
            descriptors,
            encoded: bytes.into(),
        })
    }

    /// The method at a gRPC path, if the contracts define it.
    pub fn method(&self, path: &str) -> Option<&Method> {
        self.by_path.get(path).map(|&i| &self.methods[i])
    }

    /// Every method, in descriptor order.
    pub fn methods(&self) -> impl Iterator<Item = &Method> {
        self.methods.iter()
    }

    /// The methods served through the gateway's public port, in descriptor order.
    pub fn public_methods(&self) -> impl Iterator<Item = &Method> {
        self.methods().filter(|m| m.public)
    }

    /// The whole decoded set (with source info), for reflection to filter and re-encode.
    pub fn descriptors(&self) -> &prost_types::FileDescriptorSet {
        &self.descriptors
    }

    /// The set encoded, options included: what reflection serves on the internal port.
    pub fn encoded(&self) -> std::sync::Arc<[u8]> {
        self.encoded.clone()
    }
}

/// `(service index, method index)` -> the method's leading comment, from the source info.
fn method_comments(file: &prost_types::FileDescriptorProto) -> HashMap<(usize, usize), String> {
    let Some(info) = &file.source_code_info else {
        return HashMap::new();
    };
    info.location
        .iter()
        .filter_map(|loc| match loc.path[..] {
            [SERVICE_FIELD, s, METHOD_FIELD, m] => Some((
                (usize::try_from(s).ok()?, usize::try_from(m).ok()?),
                loc.leading_comments().to_owned(),
            )),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_every_kind_of_fact_from_the_contracts() {
        let c = Contracts::tessera().unwrap();
        let create = c
            .method("/tessera.posts.v1.PostService/CreatePost")
            .unwrap();
        assert!(create.has_rule && create.public && create.user && !create.idempotent);
        assert_eq!(
            (create.package.as_str(), create.service.as_str()),
            ("tessera.posts.v1", "tessera.posts.v1.PostService")
        );
        assert_eq!(
            (create.method.as_str(), create.owner.as_str()),
            ("CreatePost", "posts")
        );
        assert!(create.callers.contains("gateway"));
        let login = c.method("/tessera.users.v1.UserService/Login").unwrap();
        assert!(
            login.comment.contains("access token"),
            "{:?}",
            login.comment
        );
        let watch = c
            .method("/tessera.posts.v1.PostService/WatchEvents")
            .unwrap();
        assert!(watch.idempotent && watch.server_streaming && !watch.client_streaming);
        assert!(!watch.public);
        assert!(c.method("/tessera.posts.v1.PostService/Nope").is_none());
        // Every method once, reachable by its path.
        assert_eq!(c.by_path.len(), c.methods().count());
        assert!(c.public_methods().all(|m| m.public && m.has_rule));
        assert!(c.public_methods().count() < c.methods().count());
    }

    #[test]
    fn garbage_is_a_decode_error() {
        assert!(Contracts::from_descriptor_set(b"\xff\xff\xff").is_err());
    }
}
