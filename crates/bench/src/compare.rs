//! Do the mesh and the monolith give the same answers? Each request goes to both and the
//! response messages are compared as the servers encoded them (raw bytes off the wire, not
//! decoded and re-encoded), so a field one side fills and the other does not is a mismatch.
//! CreatePost answers differ by nature in what the server generates (the post id, its
//! times and etag): those are blanked on both sides before the bytes are compared.

use std::marker::PhantomData;

use bytes::{Buf, Bytes};
use prost::Message;
use tessera::{
    gateway::v1::GetPostThreadRequest,
    posts::v1::{CreatePostRequest, CreatePostResponse},
};
use tonic::{
    Request, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};

use crate::client::{Conn, Pool};

const GET_POST_THREAD: &str = "/tessera.gateway.v1.FeedService/GetPostThread";
const CREATE_POST: &str = "/tessera.posts.v1.PostService/CreatePost";

/// Encodes a prost request, hands back the response's bytes untouched.
struct RawCodec<T>(PhantomData<T>);

struct RawEncoder<T>(PhantomData<T>);
struct RawDecoder;

impl<T: Message + Send + 'static> Codec for RawCodec<T> {
    type Encode = T;
    type Decode = Bytes;
    type Encoder = RawEncoder<T>;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

impl<T: Message> Encoder for RawEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding the request: {e}")))
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// What a server answered: the response bytes, or the status code and message.
type Answer = Result<Bytes, (tonic::Code, String)>;

async fn raw_unary<T: Message + Send + 'static>(
    conn: Conn,
    path: &'static str,
    message: T,
    token: Option<&str>,
) -> Answer {
    let failed = |s: Status| (s.code(), s.message().to_owned());
    let origin = conn.origin();
    let mut grpc = tonic::client::Grpc::with_origin(conn, origin);
    grpc.ready()
        .await
        .map_err(|e| (tonic::Code::Unavailable, e.to_string()))?;
    let mut req = Request::new(message);
    if let Some(token) = token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| (tonic::Code::Internal, "token is not a header value".into()))?;
        req.metadata_mut().insert("authorization", value);
    }
    grpc.unary(
        req,
        http::uri::PathAndQuery::from_static(path),
        RawCodec(PhantomData),
    )
    .await
    .map(|r| r.into_inner())
    .map_err(failed)
}

/// Requests sent to both servers.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// GetPostThread of a post, anonymous or with a reader's token.
    pub threads: Vec<(String, Option<String>)>,
    /// A CreatePost with each of these tokens.
    pub creates: Vec<String>,
}

/// How many answers were compared and which differed.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Requests answered by both servers and compared.
    pub compared: u64,
    /// Of those, the ones whose answers differed.
    pub mismatches: u64,
    /// The first few differences, described.
    pub examples: Vec<String>,
}

impl Tally {
    fn record(&mut self, what: String, a: &Answer, b: &Answer) {
        self.compared += 1;
        if a != b {
            self.mismatches += 1;
            if self.examples.len() < 3 {
                self.examples.push(format!(
                    "{what}: mesh {} vs monolith {}",
                    describe(a),
                    describe(b)
                ));
            }
        }
    }
}

fn describe(answer: &Answer) -> String {
    match answer {
        Ok(bytes) => format!("{} bytes", bytes.len()),
        Err((code, message)) => format!("{code:?} {message:?}"),
    }
}

/// The comparison of both call types.
#[derive(Clone, Debug, Default)]
pub struct Comparison {
    /// The GetPostThread requests.
    pub thread: Tally,
    /// The CreatePost requests, generated fields blanked.
    pub create: Tally,
}

/// A CreatePost answer with what the server generates blanked, re-encoded.
fn without_generated(answer: Answer) -> Answer {
    let bytes = answer?;
    let mut response = CreatePostResponse::decode(bytes)
        .map_err(|e| (tonic::Code::Internal, format!("undecodable answer: {e}")))?;
    if let Some(post) = response.post.as_mut() {
        post.post_id.clear();
        post.etag.clear();
        post.create_time = None;
        post.update_time = None;
    }
    Ok(Bytes::from(response.encode_to_vec()))
}

/// Sends every request of `sample` to `mesh` and to `monolith` and compares the answers.
pub async fn compare(mesh: &Pool, monolith: &Pool, sample: &Sample) -> Comparison {
    let mut out = Comparison::default();
    for (i, (post_id, token)) in sample.threads.iter().enumerate() {
        let req = GetPostThreadRequest {
            post_id: post_id.clone(),
            comment_page_size: 0,
        };
        let conn = |pool: &Pool| pool.get(i as u64).clone();
        let a = raw_unary(conn(mesh), GET_POST_THREAD, req.clone(), token.as_deref()).await;
        let b = raw_unary(conn(monolith), GET_POST_THREAD, req, token.as_deref()).await;
        let who = if token.is_some() {
            "reader"
        } else {
            "anonymous"
        };
        out.thread
            .record(format!("GetPostThread {post_id} ({who})"), &a, &b);
    }
    for (i, token) in sample.creates.iter().enumerate() {
        let req = CreatePostRequest {
            title: format!("Compared post {i}"),
            body: "Written to both the mesh and the monolith.".into(),
            tags: vec!["compare".into(), format!("c{i}")],
            request_id: String::new(),
        };
        let conn = |pool: &Pool| pool.get(i as u64).clone();
        let a = raw_unary(conn(mesh), CREATE_POST, req.clone(), Some(token)).await;
        let b = raw_unary(conn(monolith), CREATE_POST, req, Some(token)).await;
        out.create.record(
            format!("CreatePost #{i}"),
            &without_generated(a),
            &without_generated(b),
        );
    }
    out
}
