//! Opaque page tokens: where the previous page ended, bound to the post it lists.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use prost::Message;

/// The position after which the next page starts. Encoded as base64url protobuf, so clients
/// cannot usefully build one, and the format can grow fields.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct PageToken {
    #[prost(string, tag = "1")]
    pub post_id: String,
    #[prost(int64, tag = "2")]
    pub create_time: i64,
    #[prost(string, tag = "3")]
    pub comment_id: String,
}

impl PageToken {
    pub(crate) fn to_token(&self) -> String {
        B64.encode(self.encode_to_vec())
    }

    /// `None` for anything this service did not issue.
    pub(crate) fn from_token(token: &str) -> Option<Self> {
        let bytes = B64.decode(token).ok()?;
        let t = Self::decode(bytes.as_slice()).ok()?;
        (!t.post_id.is_empty() && !t.comment_id.is_empty()).then_some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let t = PageToken {
            post_id: "p".into(),
            create_time: 42,
            comment_id: "c".into(),
        };
        assert_eq!(PageToken::from_token(&t.to_token()), Some(t));
        for bad in [
            "",
            "!!!",
            "AAAA",
            "eyJhIjoxfQ",
            &B64.encode(b"\xff\xff\xff"),
        ] {
            assert_eq!(PageToken::from_token(bad), None, "{bad:?}");
        }
    }
}
