//! Helpers that build the gRPC statuses services return, so every service reports bad input
//! the same way: INVALID_ARGUMENT with `google.rpc.BadRequest` field violations.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Collects field violations while validating a request.
///
/// ```
/// use tessera_mesh::errors::{Violations, violated_fields};
/// use tonic::Code;
///
/// let (author_id, page_size) = ("", 500);
/// let mut v = Violations::new();
/// v.check(author_id.is_empty(), "author_id", "is required");
/// v.check(page_size > 100, "page_size", "must be at most 100");
/// let status = v.into_result().unwrap_err();
/// assert_eq!(status.code(), Code::InvalidArgument);
/// assert_eq!(violated_fields(&status), ["author_id", "page_size"]);
/// assert!(Violations::new().into_result().is_ok());
/// ```
#[derive(Default, Debug)]
pub struct Violations {
    details: Vec<(String, String)>,
}

impl Violations {
    /// An empty collection: a request with no violations yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `field` is wrong, and why.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.details.push((field.into(), description.into()));
    }

    /// Records a violation when `bad` holds.
    pub fn check(&mut self, bad: bool, field: &str, description: &str) {
        if bad {
            self.add(field, description);
        }
    }

    /// Whether nothing has been recorded, i.e. the request is valid so far.
    pub fn is_empty(&self) -> bool {
        self.details.is_empty()
    }

    /// `Ok(())` when nothing was recorded, else INVALID_ARGUMENT listing every violation.
    pub fn into_result(self) -> Result<(), Status> {
        if self.details.is_empty() {
            return Ok(());
        }
        let message = self
            .details
            .iter()
            .map(|(f, d)| format!("{f}: {d}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut details = ErrorDetails::new();
        for (field, description) in &self.details {
            details.add_bad_request_violation(field.clone(), description.clone());
        }
        Err(Status::with_error_details(
            Code::InvalidArgument,
            message,
            details,
        ))
    }
}

/// INVALID_ARGUMENT for a single field.
pub fn invalid_field(field: &str, description: &str) -> Status {
    let mut v = Violations::new();
    v.add(field, description);
    match v.into_result() {
        Err(status) => status,
        Ok(()) => Status::invalid_argument(description.to_owned()),
    }
}

/// The fields named in a status's `BadRequest` details (tests use it to check which field
/// was blamed).
///
/// ```
/// use tessera_mesh::errors::{Violations, violated_fields};
///
/// let mut v = Violations::new();
/// v.add("user_id", "is required");
/// let status = v.into_result().unwrap_err();
/// assert_eq!(violated_fields(&status), ["user_id"]);
/// assert!(violated_fields(&tonic::Status::internal("no details")).is_empty());
/// ```
pub fn violated_fields(status: &Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|br| br.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// An unexpected failure: the cause chain goes to the log, the caller sees an opaque INTERNAL.
///
/// ```
/// let status = tessera_mesh::errors::internal("disk I/O error: /var/lib/tessera/posts.db");
/// assert_eq!(status.code(), tonic::Code::Internal);
/// assert!(!status.message().contains("posts.db"));
/// ```
pub fn internal(err: impl std::fmt::Display) -> Status {
    tracing::error!(error = %err, "internal error");
    Status::internal("internal error")
}

/// Displays an error with its causes on one line, `error: cause: cause`: how an error that
/// wraps others is logged, or told to a caller that should see why.
///
/// ```
/// let err = std::io::Error::other("connection refused");
/// let line = tessera_mesh::errors::ErrorChain(&err).to_string();
/// assert_eq!(line, "connection refused");
/// ```
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// [`ErrorChain`] as a string: the error and each of its causes, for a log line or an
/// INTERNAL status's logged cause.
///
/// ```
/// use tessera_mesh::errors::error_chain;
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("cannot open the digest database")]
/// struct Open(#[source] std::io::Error);
///
/// let err = Open(std::io::Error::other("disk full"));
/// assert_eq!(error_chain(&err), "cannot open the digest database: disk full");
/// ```
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    ErrorChain(err).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("saving the post")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn a_chain_names_every_cause_in_order() {
        let err = Outer(std::io::Error::other("disk full"));
        assert_eq!(error_chain(&err), "saving the post: disk full");
        let plain = std::io::Error::other("alone");
        assert_eq!(ErrorChain(&plain).to_string(), "alone");
    }

    #[test]
    fn violations_round_trip_through_status() {
        let mut v = Violations::new();
        v.check(true, "title", "must not be empty");
        v.check(false, "body", "never");
        v.add("tags", "at most 10");
        let status = v.into_result().unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&status), vec!["title", "tags"]);
        assert!(Violations::new().into_result().is_ok());
    }
}
