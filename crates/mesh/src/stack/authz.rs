//! Identity and access on an internal port: the caller comes from the verified certificate
//! (never metadata), the contract's rule decides, then the end-user token, if any, is
//! verified again here.

use tonic::Status;

use crate::{
    auth::TokenKeys, headers::bearer_token, identity::SpiffeId, policy::MethodRule, token::EndUser,
};

/// Paths any verified peer may call: health and reflection.
pub(super) fn is_open_path(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
}

/// Decides who may call what on an internal port.
#[derive(Clone)]
pub struct Authorizer {
    /// This workload: always allowed to call itself.
    pub me: SpiffeId,
    /// Let `spiffe://<td>/ns/<ns>/sa/operator` call everything (development only).
    pub allow_operator: bool,
    /// Verifies end-user tokens; without keys every token is rejected.
    pub keys: Option<TokenKeys>,
}

impl Authorizer {
    /// Whether `caller` may call `path` under its `rule`; the error is the PERMISSION_DENIED
    /// to return.
    pub(super) fn decide(
        &self,
        caller: &SpiffeId,
        path: &str,
        rule: Option<&MethodRule>,
    ) -> Result<(), Status> {
        let denied = || Status::permission_denied(format!("caller {caller} may not call {path}"));
        if caller.trust_domain() != self.me.trust_domain()
            || caller.namespace() != self.me.namespace()
        {
            return Err(denied());
        }
        if is_open_path(path) || *caller == self.me {
            return Ok(());
        }
        if self.allow_operator && caller.service() == "operator" {
            return Ok(());
        }
        match rule {
            Some(rule) if rule.has_rule && rule.callers.contains(caller.service()) => Ok(()),
            _ => Err(denied()),
        }
    }

    /// The bearer token to verify, if any; UNAUTHENTICATED if the rule requires one and
    /// there is none, or if it cannot be verified here.
    pub(super) fn user_token<'h>(
        &self,
        headers: &'h http::HeaderMap,
        rule: Option<&MethodRule>,
    ) -> Result<Option<&'h str>, Status> {
        let required = rule.is_some_and(|r| r.user);
        match bearer_token(headers)? {
            None if required => Err(Status::unauthenticated("an access token is required")),
            Some(_) if self.keys.is_none() => Err(Status::unauthenticated(
                "access tokens cannot be verified here",
            )),
            token => Ok(token),
        }
    }

    pub(super) async fn verify_token(&self, token: &str) -> Result<EndUser, Status> {
        let Some(keys) = &self.keys else {
            return Err(Status::unauthenticated(
                "access tokens cannot be verified here",
            ));
        };
        match keys.verify(token).await {
            Ok(claims) => Ok(EndUser {
                claims,
                token: token.into(),
            }),
            Err(err) => Err(Status::unauthenticated(format!(
                "invalid access token: {err}"
            ))),
        }
    }
}
