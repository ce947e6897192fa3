"""Tessera from a client not written in Rust: Python grpcio against `tessera up`.

Stubs are generated from proto/ with grpc_tools.protoc into a temporary directory; nothing
generated is committed. The mesh runs as a child process on free ports (`--port-base 0`) and is
stopped with SIGTERM at the end, which must exit 0.

The binary is $TESSERA, else target/debug/tessera under the repository root; the tests skip
with a reason when it is missing (interop/run.sh refuses to run without it).
"""

import importlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
START_BOUND = 60  # seconds for the mesh to start
STOP_BOUND = 10  # seconds for it to drain and exit after SIGTERM
CALL_TIMEOUT = 10  # seconds, the deadline of every call

PUBLIC_SERVICES = [
    "grpc.health.v1.Health",
    "tessera.comments.v1.CommentService",
    "tessera.gateway.v1.FeedService",
    "tessera.notifications.v1.NotificationService",
    "tessera.posts.v1.PostService",
    "tessera.users.v1.UserService",
]


def tessera_binary():
    path = pathlib.Path(os.environ.get("TESSERA", ROOT / "target" / "debug" / "tessera"))
    if not path.is_absolute():
        path = ROOT / path
    return path


@pytest.fixture(scope="session")
def stubs(tmp_path_factory):
    """The contracts compiled to Python: {"users": users_pb2, "users_grpc": users_pb2_grpc, ...}."""
    import grpc_tools
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stubs")
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    assert protos, "no .proto files under proto/"
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT / 'proto'}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    assert protoc.main(args) == 0, f"protoc failed: {' '.join(args)}"
    sys.path.insert(0, str(out))
    modules = {}
    for name, proto in [
        ("users", "users"),
        ("posts", "posts"),
        ("comments", "comments"),
        ("gateway", "feed"),
    ]:
        modules[name] = importlib.import_module(f"tessera.{name}.v1.{proto}_pb2")
        modules[f"{name}_grpc"] = importlib.import_module(f"tessera.{name}.v1.{proto}_pb2_grpc")
    return modules


@pytest.fixture(scope="session")
def mesh(tmp_path_factory):
    """`tessera up` on free ports; yields endpoints.json. Teardown: SIGTERM must exit 0."""
    binary = tessera_binary()
    if not os.access(binary, os.X_OK):
        pytest.skip(f"no tessera binary at {binary} (cargo build -p tessera-cli, or set TESSERA)")
    data = tmp_path_factory.mktemp("mesh")
    log = open(data / "up.log", "wb")
    proc = subprocess.Popen(
        [str(binary), "up", "--data-dir", str(data), "--port-base", "0"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def output():
        log.flush()
        return (data / "up.log").read_text(errors="replace")

    try:
        deadline = time.monotonic() + START_BOUND
        endpoints = None
        while endpoints is None:
            if proc.poll() is not None:
                pytest.fail(f"tessera up exited with {proc.returncode}:\n{output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no endpoints.json within {START_BOUND}s:\n{output()}")
            try:
                endpoints = json.loads((data / "endpoints.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.1)
        yield endpoints
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=STOP_BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"tessera up still running {STOP_BOUND}s after SIGTERM:\n{output()}")
        assert code == 0, f"tessera up exited with {code} after SIGTERM:\n{output()}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def read(path):
    return pathlib.Path(path).read_bytes()


@pytest.fixture(scope="session")
def public(mesh):
    """A channel to the gateway's public port: server-only TLS, verified with the dev CA."""
    creds = grpc.ssl_channel_credentials(root_certificates=read(mesh["ca"]))
    with grpc.secure_channel(mesh["services"]["gateway"]["public"], creds) as channel:
        yield channel


def internal(mesh, service, operator=True):
    """A channel to an internal (mTLS) port, presenting the operator certificate if asked."""
    if operator:
        creds = grpc.ssl_channel_credentials(
            root_certificates=read(mesh["ca"]),
            private_key=read(mesh["operator"]["key"]),
            certificate_chain=read(mesh["operator"]["cert"]),
        )
    else:
        creds = grpc.ssl_channel_credentials(root_certificates=read(mesh["ca"]))
    return grpc.secure_channel(mesh["services"][service]["grpc"], creds)


def sign_up(users, u, username, display_name):
    """Creates `username` through the public port and logs in; the LoginResponse."""
    users.CreateUser(
        u.CreateUserRequest(
            username=username,
            email=f"{username}@example.com",
            password="a python password",
            display_name=display_name,
        ),
        timeout=CALL_TIMEOUT,
    )
    return users.Login(
        u.LoginRequest(username=username, password="a python password"), timeout=CALL_TIMEOUT
    )


def test_public_health_is_serving(public):
    health = health_pb2_grpc.HealthStub(public)
    resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_public_reflection_lists_exactly_the_public_services(public):
    db = ProtoReflectionDescriptorDatabase(public)
    assert sorted(db.get_services()) == PUBLIC_SERVICES
    # Whole descriptors come through too, with their imports (users, posts, comments protos).
    pool = descriptor_pool.DescriptorPool(db)
    feed = pool.FindServiceByName("tessera.gateway.v1.FeedService")
    thread = feed.methods_by_name["GetPostThread"]
    assert thread.output_type.fields_by_name["post"].message_type.full_name == "tessera.posts.v1.Post"
    create = pool.FindMethodByName("tessera.posts.v1.PostService.CreatePost")
    assert create.input_type.full_name == "tessera.posts.v1.CreatePostRequest"


def test_sign_up_post_comment_and_read_the_thread(public, stubs):
    users = stubs["users_grpc"].UserServiceStub(public)
    posts = stubs["posts_grpc"].PostServiceStub(public)
    comments = stubs["comments_grpc"].CommentServiceStub(public)
    feed = stubs["gateway_grpc"].FeedServiceStub(public)
    u, p, c, g = stubs["users"], stubs["posts"], stubs["comments"], stubs["gateway"]

    created = users.CreateUser(
        u.CreateUserRequest(
            username="pyclient",
            email="pyclient@example.com",
            password="a python password",
            display_name="Python Client",
        ),
        timeout=CALL_TIMEOUT,
    ).user
    assert created.user_id and created.username == "pyclient"
    assert created.role == u.ROLE_USER

    login = users.Login(
        u.LoginRequest(username="pyclient", password="a python password"), timeout=CALL_TIMEOUT
    )
    assert login.access_token.count(".") == 2, "a JWT"
    assert login.user.user_id == created.user_id
    auth = (("authorization", f"Bearer {login.access_token}"),)

    # No token, no post.
    with pytest.raises(grpc.RpcError) as err:
        posts.CreatePost(p.CreatePostRequest(title="t", body="b"), timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    post = posts.CreatePost(
        p.CreatePostRequest(title="From Python", body="grpcio says hello", tags=["interop"]),
        metadata=auth,
        timeout=CALL_TIMEOUT,
    ).post
    assert post.post_id and post.author_id == created.user_id
    assert list(post.tags) == ["interop"]

    comment = comments.CreateComment(
        c.CreateCommentRequest(post_id=post.post_id, body="and Rust answers"),
        metadata=auth,
        timeout=CALL_TIMEOUT,
    ).comment
    assert comment.post_id == post.post_id and comment.author_id == created.user_id

    thread = feed.GetPostThread(
        g.GetPostThreadRequest(post_id=post.post_id, comment_page_size=10), timeout=CALL_TIMEOUT
    )
    assert thread.post.title == "From Python"
    assert thread.author.username == "pyclient"
    assert [t.comment.body for t in thread.comments] == ["and Rust answers"]
    assert thread.comments[0].author.display_name == "Python Client"

    with pytest.raises(grpc.RpcError) as err:
        feed.GetPostThread(g.GetPostThreadRequest(post_id="no-such-post"), timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value


def test_refresh_rotates_reuse_and_logout_end_the_session(public, stubs):
    users = stubs["users_grpc"].UserServiceStub(public)
    posts = stubs["posts_grpc"].PostServiceStub(public)
    u, p = stubs["users"], stubs["posts"]
    login = sign_up(users, u, "pyrefresh", "Python Refresh")
    assert login.refresh_token and login.expires_in == 900

    refreshed = users.RefreshToken(
        u.RefreshTokenRequest(refresh_token=login.refresh_token), timeout=CALL_TIMEOUT
    )
    assert refreshed.refresh_token != login.refresh_token
    assert refreshed.expires_in == 900
    posts.CreatePost(
        p.CreatePostRequest(title="refreshed", body="from a refreshed token"),
        metadata=(("authorization", f"Bearer {refreshed.access_token}"),),
        timeout=CALL_TIMEOUT,
    )

    # The first token again: reuse, the whole session is revoked.
    for token in (login.refresh_token, refreshed.refresh_token):
        with pytest.raises(grpc.RpcError) as err:
            users.RefreshToken(u.RefreshTokenRequest(refresh_token=token), timeout=CALL_TIMEOUT)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value

    second = users.Login(
        u.LoginRequest(username="pyrefresh", password="a python password"), timeout=CALL_TIMEOUT
    )
    users.Logout(u.LogoutRequest(refresh_token=second.refresh_token), timeout=CALL_TIMEOUT)
    with pytest.raises(grpc.RpcError) as err:
        users.RefreshToken(
            u.RefreshTokenRequest(refresh_token=second.refresh_token), timeout=CALL_TIMEOUT
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    with pytest.raises(grpc.RpcError) as err:
        users.RefreshToken(u.RefreshTokenRequest(refresh_token=""), timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_internal_health_over_mtls_with_the_operator_certificate(mesh):
    with internal(mesh, "users") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        resp = health.Check(
            health_pb2.HealthCheckRequest(service="tessera.users.v1.UserService"),
            timeout=CALL_TIMEOUT,
        )
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_internal_port_refuses_a_client_without_a_certificate(mesh):
    with internal(mesh, "users", operator=False) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_follower_names_the_kinds_it_wants_and_gets_a_marker_for_the_rest(mesh, public, stubs):
    """As comments' workload: PostService.WatchEvents with event_fields=[4] (post_deleted)."""
    users = stubs["users_grpc"].UserServiceStub(public)
    posts_public = stubs["posts_grpc"].PostServiceStub(public)
    u, p = stubs["users"], stubs["posts"]
    token = sign_up(users, u, "pywatcher", "Python Watcher").access_token
    auth = (("authorization", f"Bearer {token}"),)

    certs = pathlib.Path(mesh["operator"]["cert"]).parent.parent / "comments"
    creds = grpc.ssl_channel_credentials(
        root_certificates=read(mesh["ca"]),
        private_key=read(certs / "tls.key"),
        certificate_chain=read(certs / "tls.crt"),
    )
    with grpc.secure_channel(mesh["services"]["posts"]["grpc"], creds) as channel:
        posts = stubs["posts_grpc"].PostServiceStub(channel)
        stream = posts.WatchEvents(
            p.WatchEventsRequest(from_now=True, event_fields=[4]), timeout=CALL_TIMEOUT
        )
        stream.initial_metadata()  # from here on, every commit is in the stream

        def create(title):
            return posts_public.CreatePost(
                p.CreatePostRequest(title=title, body="b"), metadata=auth, timeout=CALL_TIMEOUT
            ).post

        doomed = create("soon gone")
        posts_public.DeletePost(
            p.DeletePostRequest(post_id=doomed.post_id), metadata=auth, timeout=CALL_TIMEOUT
        )
        create("kept")
        deleted = next(stream)
        assert deleted.WhichOneof("event") == "post_deleted"
        assert deleted.post_deleted.post_id == doomed.post_id
        marker = next(stream)
        assert marker.WhichOneof("event") is None, marker
        assert marker.sequence == deleted.sequence + 1
        assert marker.epoch == deleted.epoch
        stream.cancel()

        bad = posts.WatchEvents(p.WatchEventsRequest(event_fields=[4, 9]), timeout=CALL_TIMEOUT)
        with pytest.raises(grpc.RpcError) as err:
            next(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
