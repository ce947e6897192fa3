//! Opaque page tokens for keyset listings, one format for every service.
//!
//! A listing ordered by `(create_time, id)` hands out where its page ended, bound to what it
//! lists (its scope: the post whose comments, the author filter, the user and filter), so a
//! token cannot be replayed against another listing. Encoded as base64url protobuf: clients
//! cannot usefully build one, and the format can grow fields.
//!
//! ```
//! use tessera_store::PageToken;
//!
//! let next = PageToken::new("post-1", 1_700_000_000_000_000, "comment-9").encode();
//! let after = PageToken::decode(&next, "post-1").unwrap().unwrap();
//! assert_eq!((after.create_time, after.id.as_str()), (1_700_000_000_000_000, "comment-9"));
//! assert!(PageToken::decode("", "post-1").unwrap().is_none());
//! let status = tonic::Status::from(PageToken::decode(&next, "post-2").unwrap_err());
//! assert_eq!(status.code(), tonic::Code::InvalidArgument);
//! ```

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use prost::Message;
use tessera_mesh::errors::invalid_field;
use tonic::Status;

/// Where the next page starts: after the row with this create time and id, in `scope`.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct PageToken {
    /// What the listing lists (e.g. the post id whose comments these are); a token is only
    /// accepted by a listing of the same scope.
    #[prost(string, tag = "1")]
    pub scope: String,
    /// The last row's create time.
    #[prost(int64, tag = "2")]
    pub create_time: i64,
    /// The last row's id (the tie-breaker among equal create times).
    #[prost(string, tag = "3")]
    pub id: String,
}

/// Why a page token was refused; as a `Status`, INVALID_ARGUMENT with a field violation on
/// `page_token` ([`BadPageToken::reason`] is its description).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadPageToken {
    /// Not a token this service issued.
    Garbage,
    /// A token of another listing (another post, author, user or filter).
    OtherScope,
}

impl BadPageToken {
    /// The field violation's description.
    pub fn reason(self) -> &'static str {
        match self {
            BadPageToken::Garbage => "is not a page token this service issued",
            BadPageToken::OtherScope => "was issued for another listing (another parent or filter)",
        }
    }
}

impl From<BadPageToken> for Status {
    fn from(bad: BadPageToken) -> Status {
        invalid_field("page_token", bad.reason())
    }
}

impl PageToken {
    /// The token of a page that ended at `(create_time, id)` of `scope`.
    pub fn new(scope: impl Into<String>, create_time: i64, id: impl Into<String>) -> Self {
        Self {
            scope: scope.into(),
            create_time,
            id: id.into(),
        }
    }

    /// The opaque text a response carries as `next_page_token`.
    pub fn encode(&self) -> String {
        B64.encode(self.encode_to_vec())
    }

    /// A request's `page_token` for a listing of `scope`: `None` when empty (the first
    /// page), refused when it is not one this service issued or is of another scope.
    pub fn decode(token: &str, scope: &str) -> Result<Option<Self>, BadPageToken> {
        if token.is_empty() {
            return Ok(None);
        }
        let bytes = B64.decode(token).map_err(|_| BadPageToken::Garbage)?;
        let page =
            <Self as Message>::decode(bytes.as_slice()).map_err(|_| BadPageToken::Garbage)?;
        if page.id.is_empty() {
            return Err(BadPageToken::Garbage);
        }
        if page.scope != scope {
            return Err(BadPageToken::OtherScope);
        }
        Ok(Some(page))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage_and_other_scopes() {
        let t = PageToken::new("a\nb", -42, "id-1");
        assert_eq!(PageToken::decode(&t.encode(), "a\nb"), Ok(Some(t.clone())));
        assert_eq!(PageToken::decode("", "x"), Ok(None));
        assert_eq!(
            PageToken::decode(&t.encode(), "a"),
            Err(BadPageToken::OtherScope)
        );
        // An empty scope is a scope too (e.g. "all authors").
        let all = PageToken::new("", 1, "p");
        assert_eq!(PageToken::decode(&all.encode(), ""), Ok(Some(all.clone())));
        assert_eq!(
            PageToken::decode(&all.encode(), "u"),
            Err(BadPageToken::OtherScope)
        );
        for bad in [
            "!!!",
            "AAAA",
            "eyJhIjoxfQ",
            &B64.encode(b"\xff\xff\xff"),
            &PageToken::new("s", 1, "").encode(),
        ] {
            assert_eq!(
                PageToken::decode(bad, "s"),
                Err(BadPageToken::Garbage),
                "{bad:?}"
            );
        }
        let status = Status::from(BadPageToken::Garbage);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            tessera_mesh::errors::violated_fields(&status),
            ["page_token"]
        );
    }
}
