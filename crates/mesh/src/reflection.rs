//! gRPC server reflection (v1 and v1alpha) and health on a service port. The internal port
//! describes the contracts whole; the gateway's public port only the advertised services, each
//! with only its public methods.

use tonic::service::Routes;
use tonic_health::server::HealthReporter;

use crate::contracts::{Contracts, METHOD_FIELD, SERVICE_FIELD};

/// The contracts' descriptors as the public port shows them: only the `advertise`d services,
/// each with only its public methods, so `describe` does not reveal internal methods. The
/// access rules (custom method options, dropped by this decoding) are not shown there either;
/// comments are kept, moved along with the services and methods they belong to.
fn public_descriptor_set(advertise: &[String]) -> Result<Vec<u8>, prost::DecodeError> {
    use prost::Message as _;
    let contracts = Contracts::tessera()?;
    let mut set = contracts.descriptors().clone();
    for file in &mut set.file {
        let package = file.package().to_owned();
        // Old index -> new index, per service and per method of each service.
        let mut services: Vec<Option<(i32, Vec<Option<i32>>)>> = Vec::new();
        let mut kept = 0;
        for service in &file.service {
            let full = format!("{package}.{}", service.name());
            if !advertise.contains(&full) {
                services.push(None);
                continue;
            }
            let mut next = 0;
            let methods = service
                .method
                .iter()
                .map(|m| {
                    let public = contracts
                        .method(&format!("/{full}/{}", m.name()))
                        .is_some_and(|method| method.public);
                    public.then(|| {
                        next += 1;
                        next - 1
                    })
                })
                .collect();
            services.push(Some((kept, methods)));
            kept += 1;
        }
        let mut index = 0;
        file.service.retain_mut(|service| {
            let slot = services.get(index).cloned().flatten();
            index += 1;
            let Some((_, methods)) = slot else {
                return false;
            };
            let mut m = 0;
            service.method.retain(|_| {
                m += 1;
                methods.get(m - 1).copied().flatten().is_some()
            });
            true
        });
        if let Some(info) = &mut file.source_code_info {
            info.location.retain_mut(|loc| {
                if loc.path.first() != Some(&SERVICE_FIELD) {
                    return true;
                }
                let Some(old) = loc.path.get(1).and_then(|i| usize::try_from(*i).ok()) else {
                    return true;
                };
                let Some(Some((new, methods))) = services.get(old) else {
                    return false;
                };
                loc.path[1] = *new;
                if loc.path.get(2) == Some(&METHOD_FIELD)
                    && let Some(old) = loc.path.get(3).and_then(|i| usize::try_from(*i).ok())
                {
                    match methods.get(old).copied().flatten() {
                        Some(new) => loc.path[3] = new,
                        None => return false,
                    }
                }
                true
            });
        }
    }
    Ok(set.encode_to_vec())
}

/// Adds gRPC health (this reporter) and reflection v1 and v1alpha to `routes`, describing
/// `contracts` (an encoded descriptor set, such as [`crate::policy::Policy::descriptor_set`]).
/// With `advertise`, reflection lists only those services.
pub fn with_health_and_reflection(
    routes: Routes,
    health: &HealthReporter,
    advertise: Option<&[String]>,
    contracts: &[u8],
) -> Routes {
    health_and_reflection(routes, health, advertise, Some(contracts))
}

/// [`with_health_and_reflection`] for the gateway's public port: reflection lists the
/// `advertise`d services and describes only their public methods.
pub fn with_health_and_public_reflection(
    routes: Routes,
    health: &HealthReporter,
    advertise: &[String],
) -> Routes {
    health_and_reflection(routes, health, Some(advertise), None)
}

/// `contracts`: the set to describe whole; `None` for the public port's filtered one.
fn health_and_reflection(
    routes: Routes,
    health: &HealthReporter,
    advertise: Option<&[String]>,
    contracts: Option<&[u8]>,
) -> Routes {
    let health = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(health.clone()),
    );
    let mut routes = routes.add_service(health);
    let contracts: std::borrow::Cow<'_, [u8]> = match (contracts, advertise) {
        (Some(whole), _) => whole.into(),
        (None, names) => match public_descriptor_set(names.unwrap_or_default()) {
            Ok(set) => set.into(),
            Err(err) => {
                // Compiled in: a failure here is a build defect. Describe nothing then.
                tracing::error!(error = %err, "cannot filter the contracts for public reflection");
                Vec::new().into()
            }
        },
    };
    let configure = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(&contracts)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        if let Some(names) = advertise {
            for name in names {
                builder = builder.with_service_name(name.clone());
            }
            builder = builder.with_service_name("grpc.health.v1.Health");
        }
        builder
    };
    // The descriptor sets are compiled in; failing to build from them is a build defect.
    match configure().build_v1() {
        Ok(v1) => routes = routes.add_service(v1),
        Err(err) => tracing::error!(error = %err, "reflection v1 unavailable"),
    }
    match configure().build_v1alpha() {
        Ok(v1alpha) => routes = routes.add_service(v1alpha),
        Err(err) => tracing::error!(error = %err, "reflection v1alpha unavailable"),
    }
    routes
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use prost::Message as _;
    use prost_types::FileDescriptorSet;

    use super::*;

    /// `service/method` -> its leading comment, read through the filtered source locations.
    fn method_comments(set: &FileDescriptorSet) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for file in &set.file {
            let Some(info) = &file.source_code_info else {
                continue;
            };
            for loc in &info.location {
                if let [6, s, 2, m] = loc.path[..] {
                    let service = &file.service[s as usize];
                    let method = &service.method[m as usize];
                    out.insert(
                        format!("{}/{}", service.name(), method.name()),
                        loc.leading_comments().to_owned(),
                    );
                }
            }
        }
        out
    }

    #[test]
    fn public_descriptors_keep_public_methods_with_their_own_comments() {
        let contracts = Contracts::tessera().unwrap();
        let advertised = ["tessera.users.v1.UserService".to_owned()];
        let public =
            FileDescriptorSet::decode(&public_descriptor_set(&advertised).unwrap()[..]).unwrap();
        let services: Vec<&str> = public
            .file
            .iter()
            .flat_map(|f| f.service.iter().map(|s| s.name()))
            .collect();
        assert_eq!(services, ["UserService"]);
        let after = method_comments(&public);
        assert!(after.contains_key("UserService/Login"), "{after:?}");
        assert!(!after.contains_key("UserService/WatchEvents"), "{after:?}");
        for (method, comment) in &after {
            assert!(!comment.is_empty(), "{method} lost its comment");
            let path = format!("/tessera.users.v1.{method}");
            assert_eq!(
                Some(comment),
                contracts.method(&path).map(|m| &m.comment),
                "{method}"
            );
        }
        let public_users = contracts
            .public_methods()
            .filter(|m| m.service == "tessera.users.v1.UserService")
            .count();
        assert_eq!(after.len(), public_users);
    }
}
