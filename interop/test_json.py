"""The public HTTP/JSON API and gRPC-Web, from Python's own HTTP client (urllib, HTTP/1.1),
compared with what grpcio gets from the same port for the same data.

JSON answers are compared with `json_format.MessageToDict` of the gRPC answer: both are the
canonical proto3 JSON mapping (lowerCamelCase names, 64-bit integers as strings, Timestamps in
RFC 3339, enums by name, defaults left out).
"""

import json
import ssl
import struct
import urllib.error
import urllib.request

import grpc
import pytest
from google.protobuf import json_format

from test_interop import CALL_TIMEOUT, mesh, public, read, stubs  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def http(mesh):  # noqa: F811
    """call(method, path, body=None, token=None, headers=None) -> (status, headers, bytes)."""
    context = ssl.create_default_context(cafile=mesh["ca"])
    base = f"https://{mesh['services']['gateway']['public']}"

    def call(method, path, body=None, token=None, headers=None, raw=False):
        data = body if raw or body is None else json.dumps(body).encode()
        req = urllib.request.Request(base + path, data=data, method=method)
        if data is not None and not raw:
            req.add_header("content-type", "application/json")
        if token:
            req.add_header("authorization", f"Bearer {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, context=context, timeout=CALL_TIMEOUT) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers, err.read()

    return call


def as_json(answer):
    status, headers, body = answer
    assert headers["content-type"].startswith("application/json"), (status, body)
    return status, json.loads(body)


def grpc_dict(message):
    return json_format.MessageToDict(message)


def test_json_and_grpc_answer_the_same(http, public, stubs):  # noqa: F811
    u, p, c, g = stubs["users"], stubs["posts"], stubs["comments"], stubs["gateway"]
    users = stubs["users_grpc"].UserServiceStub(public)
    posts = stubs["posts_grpc"].PostServiceStub(public)
    comments = stubs["comments_grpc"].CommentServiceStub(public)
    feed = stubs["gateway_grpc"].FeedServiceStub(public)

    status, created = as_json(
        http(
            "POST",
            "/v1/users",
            {
                "username": "jsonclient",
                "email": "jsonclient@example.com",
                "password": "a json password",
                "displayName": "JSON Client",
            },
        )
    )
    assert status == 200, created
    user_id = created["user"]["userId"]
    assert created["user"]["role"] == "ROLE_USER"

    status, login = as_json(
        http("POST", "/v1/auth/login", {"username": "jsonclient", "password": "a json password"})
    )
    assert status == 200, login
    token = login["accessToken"]
    auth = (("authorization", f"Bearer {token}"),)

    status, made = as_json(
        http("POST", "/v1/posts", {"title": "Over JSON", "body": "hello", "tags": ["json"]}, token)
    )
    assert status == 200, made
    post_id = made["post"]["postId"]
    assert made["post"]["authorId"] == user_id

    # A comment written over gRPC, read back over JSON.
    comments.CreateComment(
        c.CreateCommentRequest(post_id=post_id, body="from grpc"), metadata=auth, timeout=CALL_TIMEOUT
    )
    status, commented = as_json(
        http("POST", f"/v1/posts/{post_id}/comments", {"body": "from json"}, token)
    )
    assert status == 200, commented

    pairs = [
        (f"/v1/posts/{post_id}", posts.GetPost(p.GetPostRequest(post_id=post_id), timeout=CALL_TIMEOUT)),
        (
            f"/v1/posts/{post_id}/comments?pageSize=10",
            comments.ListComments(
                c.ListCommentsRequest(post_id=post_id, page_size=10), timeout=CALL_TIMEOUT
            ),
        ),
        (
            f"/v1/posts/{post_id}/thread?comment_page_size=10",
            # With the reader's token: the thread shows its owner their own email.
            feed.GetPostThread(
                g.GetPostThreadRequest(post_id=post_id, comment_page_size=10),
                metadata=auth,
                timeout=CALL_TIMEOUT,
            ),
        ),
        (
            f"/v1/posts?authorId={user_id}",
            posts.ListPosts(p.ListPostsRequest(author_id=user_id), timeout=CALL_TIMEOUT),
        ),
        (
            f"/v1/users/{user_id}",
            users.GetUser(u.GetUserRequest(user_id=user_id), metadata=auth, timeout=CALL_TIMEOUT),
        ),
        (
            f"/v1/users:batchGet?userIds={user_id}&userIds=missing",
            users.BatchGetUsers(
                u.BatchGetUsersRequest(user_ids=[user_id, "missing"]),
                metadata=auth,
                timeout=CALL_TIMEOUT,
            ),
        ),
    ]
    for path, grpc_answer in pairs:
        # The owner sees their email over both.
        status, answer = as_json(http("GET", path, token=token))
        assert status == 200, (path, answer)
        assert answer == grpc_dict(grpc_answer), path
    status, thread = as_json(http("GET", f"/v1/posts/{post_id}/thread"))
    assert [t["comment"]["body"] for t in thread["comments"]] == ["from grpc", "from json"]
    assert thread["comments"][0]["author"]["displayName"] == "JSON Client"

    # An update through the body field and the update mask, then the old etag is stale.
    etag = made["post"]["etag"]
    status, updated = as_json(
        http("PATCH", f"/v1/posts/{post_id}?updateMask=title&etag={etag}", {"title": "Renamed"}, token)
    )
    assert status == 200, updated
    assert updated["post"]["title"] == "Renamed" and updated["post"]["body"] == "hello"
    status, stale = as_json(
        http("PATCH", f"/v1/posts/{post_id}?updateMask=title&etag={etag}", {"title": "Again"}, token)
    )
    assert status == 409 and stale["code"] == grpc.StatusCode.ABORTED.value[0], stale

    # The same failure over both: code, message.
    with pytest.raises(grpc.RpcError) as err:
        posts.GetPost(p.GetPostRequest(post_id="no-such-post"), timeout=CALL_TIMEOUT)
    status, missing = as_json(http("GET", "/v1/posts/no-such-post"))
    assert status == 404
    assert missing["code"] == err.value.code().value[0] == 5
    assert missing["message"] == err.value.details()

    status, deleted = as_json(http("DELETE", f"/v1/posts/{post_id}", token=token))
    assert status == 200 and deleted == {}, deleted


def test_json_errors_have_the_standard_http_status_and_details(http):
    status, body = as_json(http("POST", "/v1/posts", {"title": "no token"}))
    assert status == 401 and body["code"] == 16, body
    status, body = as_json(http("POST", "/v1/posts", {"title": "bad token"}, token="x.y.z"))
    assert status == 401 and body["code"] == 16, body

    status, body = as_json(http("POST", "/v1/users", {"username": "", "email": "nope"}))
    assert status == 400 and body["code"] == 3, body
    detail = body["details"][0]
    assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert {v["field"] for v in detail["fieldViolations"]} >= {"username"}, detail

    status, body = as_json(http("GET", "/v1/posts?pageSize=many"))
    assert status == 400
    assert body["details"][0]["fieldViolations"][0]["field"] == "pageSize", body

    status, body = as_json(http("POST", "/v1/users", b"{not json", raw=True))
    assert status == 400 and body["code"] == 3, body

    status, body = as_json(http("GET", "/v1/nothing/here"))
    assert status == 404 and body["code"] == 5, body
    status, headers, _ = http("PUT", "/v1/posts/x", {})
    assert status == 405 and "PATCH" in headers["allow"], headers


def test_openapi_document_is_served_and_valid(http):
    from openapi_spec_validator import validate

    status, doc = as_json(http("GET", "/openapi.json"))
    assert status == 200
    validate(doc)
    assert doc["paths"]["/v1/posts/{post.post_id}"]["patch"]["security"] == [{"bearer": []}]
    assert "get" in doc["paths"]["/v1/posts/{post_id}/thread"]


def test_grpc_web_on_the_same_port(http, stubs):  # noqa: F811
    p = stubs["posts"]
    request = p.ListPostsRequest(page_size=1).SerializeToString()
    frame = b"\x00" + struct.pack(">I", len(request)) + request
    status, headers, body = http(
        "POST",
        "/tessera.posts.v1.PostService/ListPosts",
        frame,
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
        raw=True,
    )
    assert status == 200, body
    assert headers["content-type"].startswith("application/grpc-web"), headers
    messages, trailers = [], {}
    while body:
        flag, length = body[0], struct.unpack(">I", body[1:5])[0]
        chunk, body = body[5 : 5 + length], body[5 + length :]
        if flag & 0x80:
            for line in chunk.decode().strip().split("\r\n"):
                k, _, v = line.partition(":")
                trailers[k.strip().lower()] = v.strip()
        else:
            messages.append(p.ListPostsResponse.FromString(chunk))
    assert trailers.get("grpc-status") == "0", trailers
    assert len(messages) == 1


def test_cross_origin_is_refused_by_default(http):
    status, headers, _ = http(
        "OPTIONS",
        "/v1/posts",
        headers={"origin": "https://elsewhere.example", "access-control-request-method": "POST"},
    )
    assert status == 403
    assert "access-control-allow-origin" not in {k.lower() for k in headers.keys()}


def test_the_web_front_end_is_served(http):
    status, headers, body = http("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"app.js" in body
