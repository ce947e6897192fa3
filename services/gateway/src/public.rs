//! Which methods the contracts mark public, as [`tessera_mesh::contracts`] reads them.

use tessera_mesh::contracts::Contracts;

use crate::Error;

/// A method reachable through the gateway: its path, package, service, name, whether an
/// end-user token is required and its streaming kinds.
pub type PublicMethod = tessera_mesh::contracts::Method;

/// The public methods of every Tessera contract, in descriptor order.
pub fn public_methods() -> Result<Vec<PublicMethod>, Error> {
    Ok(Contracts::tessera()?.public_methods().cloned().collect())
}

/// The public methods described by an encoded `google.protobuf.FileDescriptorSet`.
pub fn public_methods_in(descriptor_set: &[u8]) -> Result<Vec<PublicMethod>, Error> {
    Ok(Contracts::from_descriptor_set(descriptor_set)?
        .public_methods()
        .cloned()
        .collect())
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
