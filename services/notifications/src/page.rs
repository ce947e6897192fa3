//! Opaque page tokens: where the previous page ended, bound to the caller and the filter.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use prost::Message;

/// The position after which the next page starts (newest first: the next page holds older
/// notifications). Encoded as base64url protobuf.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct PageToken {
    #[prost(string, tag = "1")]
    pub user_id: String,
    #[prost(bool, tag = "2")]
    pub unread_only: bool,
    #[prost(int64, tag = "3")]
    pub create_time: i64,
    #[prost(string, tag = "4")]
    pub notification_id: String,
}

impl PageToken {
    pub(crate) fn to_token(&self) -> String {
        B64.encode(self.encode_to_vec())
    }

    /// `None` for anything this service did not issue.
    pub(crate) fn from_token(token: &str) -> Option<Self> {
        let bytes = B64.decode(token).ok()?;
        let t = Self::decode(bytes.as_slice()).ok()?;
        (!t.user_id.is_empty() && !t.notification_id.is_empty()).then_some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let t = PageToken {
            user_id: "u".into(),
            unread_only: true,
            create_time: 42,
            notification_id: "n".into(),
        };
        assert_eq!(PageToken::from_token(&t.to_token()), Some(t));
        for bad in ["", "!!!", "AAAA", &B64.encode(b"\xff\xff\xff")] {
            assert_eq!(PageToken::from_token(bad), None, "{bad:?}");
        }
    }
}
