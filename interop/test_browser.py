"""The web front end in a real browser: headless Chromium, driven over the DevTools protocol,
signs up, writes a post, comments on it and reads the thread, against `tessera up`.

Chromium trusts only the gateway's own key (`--ignore-certificate-errors-spki-list`), not every
certificate. A screenshot is written to $TESSERA_ARTIFACTS (default target/artifacts) when a
step fails, for CI to keep; with TESSERA_KEEP_SCREENSHOTS=1 also after the last step.
Skips with a reason when Chromium, openssl or websocket-client is missing.
"""

import base64
import json
import os
import pathlib
import shutil
import subprocess
import time
import urllib.request

import pytest

from test_interop import ROOT, mesh  # noqa: F401 (fixture)

START_BOUND = 30  # seconds for Chromium to open its DevTools port
STEP_BOUND = 15  # seconds for any one page condition
CDP_BOUND = 20  # seconds for any one DevTools command


def chromium_binary():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def spki_hash(cert_path):
    """base64(sha256(SubjectPublicKeyInfo)) of a PEM certificate, as Chromium wants it."""
    pub = subprocess.run(
        ["openssl", "x509", "-in", str(cert_path), "-pubkey", "-noout"],
        check=True,
        capture_output=True,
    ).stdout
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "der"], input=pub, check=True, capture_output=True
    ).stdout
    import hashlib

    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class Page:
    """One DevTools websocket session; `call` waits for its own answer, skipping events."""

    def __init__(self, ws_url):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=CDP_BOUND, suppress_origin=True)
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + CDP_BOUND
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg.get("result", {})
        raise AssertionError(f"{method}: no answer within {CDP_BOUND}s")

    def js(self, expression):
        result = self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, condition, what):
        """Polls a JS condition in the page, bounded by STEP_BOUND."""
        ok = self.js(
            f"""(async () => {{
                const end = Date.now() + {STEP_BOUND * 1000};
                while (Date.now() < end) {{
                    try {{ if ({condition}) return true; }} catch (e) {{}}
                    await new Promise(r => setTimeout(r, 50));
                }}
                return false;
            }})()"""
        )
        if not ok:
            flash = self.js("document.getElementById('flash').textContent")
            raise AssertionError(f"page never showed {what} (flash: {flash!r})")

    def fill(self, form_id, values):
        self.js(
            f"""(() => {{
                const form = document.getElementById({json.dumps(form_id)});
                for (const [name, value] of Object.entries({json.dumps(values)})) {{
                    form.elements[name].value = value;
                }}
                form.requestSubmit();
            }})()"""
        )

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self):
        self.ws.close()


@pytest.fixture
def browser(mesh, tmp_path):  # noqa: F811
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    pytest.importorskip("websocket", reason="websocket-client is not installed")
    if shutil.which("openssl") is None:
        pytest.skip("no openssl on PATH (to pin the gateway's key for chromium)")
    public = mesh["services"]["gateway"]["public"]
    cert = pathlib.Path(mesh["ca"]).parent / "gateway" / "tls.crt"
    proc = subprocess.Popen(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1100,900",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--ignore-certificate-errors-spki-list={spki_hash(cert)}",
            "about:blank",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    page = None
    try:
        # Chromium names its DevTools port in a file in the profile once it listens.
        port_file = tmp_path / "profile" / "DevToolsActivePort"
        deadline = time.monotonic() + START_BOUND
        while not port_file.exists() or not port_file.read_text().strip():
            if proc.poll() is not None:
                pytest.fail(f"chromium exited with {proc.returncode}: {proc.stderr.read()[-2000:]!r}")
            if time.monotonic() > deadline:
                pytest.fail(f"chromium opened no DevTools port within {START_BOUND}s")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=CDP_BOUND) as r:
            targets = [t for t in json.load(r) if t.get("type") == "page"]
        assert targets, "chromium has no page"
        page = Page(targets[0]["webSocketDebuggerUrl"])
        page.call("Page.enable")
        page.call("Runtime.enable")
        page.base = f"https://{public}"
        yield page
    finally:
        if page is not None:
            page.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def artifacts():
    return pathlib.Path(os.environ.get("TESSERA_ARTIFACTS", ROOT / "target" / "artifacts"))


def other_user_comments(base, ca, post_id, suffix, author_token):
    """A second user, over the JSON API, comments on the post; returns their display name once
    the author's notification exists (a bounded poll: notifications follow through events)."""
    import ssl

    context = ssl.create_default_context(cafile=ca)

    def call(method, path, body=None, token=None):
        req = urllib.request.Request(
            base + path, data=json.dumps(body).encode() if body is not None else None, method=method
        )
        req.add_header("content-type", "application/json")
        if token:
            req.add_header("authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, context=context, timeout=10) as r:
            return json.load(r)

    name = f"other{suffix}"
    call("POST", "/v1/users", {"username": name, "email": f"{name}@example.com", "password": "another password", "displayName": "Other Person"})
    token = call("POST", "/v1/auth/login", {"username": name, "password": "another password"})["accessToken"]
    call("POST", f"/v1/posts/{post_id}/comments", {"body": "A comment from elsewhere."}, token)
    deadline = time.monotonic() + STEP_BOUND
    while call("GET", "/v1/notifications?unreadOnly=true", token=author_token).get("unreadCount") != "1":
        assert time.monotonic() < deadline, f"no notification within {STEP_BOUND}s"
        time.sleep(0.1)
    return "Other Person"


def test_sign_up_post_comment_and_read_the_thread_in_a_browser(browser, mesh):  # noqa: F811
    page = browser
    suffix = str(int(time.time() * 1000))[-6:]
    username = f"web{suffix}"
    title = f"Hello from Chromium {suffix}"
    started = time.monotonic()
    try:
        page.call("Page.navigate", url=page.base + "/#/signup")
        page.wait("document.getElementById('signup-form') && !document.getElementById('view-signup').hidden", "the sign-up form")
        page.fill(
            "signup-form",
            {
                "username": username,
                "displayName": "Web Tester",
                "email": f"{username}@example.com",
                "password": "a browser password",
            },
        )
        page.wait(f"document.getElementById('me').textContent === '@{username}'", "the signed-in user")
        page.wait("!document.getElementById('view-latest').hidden", "the latest posts")

        page.js("location.hash = '#/new'")
        page.wait("!document.getElementById('view-new').hidden", "the post form")
        page.fill("post-form", {"title": title, "body": "Written by a headless browser.", "tags": "web, test"})
        page.wait(
            f"location.hash.startsWith('#/posts/') && document.querySelector('#thread-post h1').textContent === {json.dumps(title)}",
            "the new post's thread",
        )
        byline = page.js("document.querySelector('#thread-post .meta').textContent")
        assert byline.startswith("by Web Tester"), byline
        post_id = page.js("decodeURIComponent(location.hash.slice('#/posts/'.length))")

        page.fill("comment-form", {"body": "A comment from the browser."})
        page.wait(
            "[...document.querySelectorAll('#thread-comments li')].some(li => li.textContent.includes('A comment from the browser.') && li.textContent.includes('Web Tester'))",
            "the comment with its author",
        )

        page.js("location.hash = '#/'")
        page.wait(
            f"[...document.querySelectorAll('#posts a.title')].some(a => a.textContent === {json.dumps(title)})",
            "the post among the latest",
        )

        # Someone else comments (over the API); the author sees it in their notifications.
        author_token = page.js("localStorage.getItem('tessera.token')")
        other = other_user_comments(page.base, mesh["ca"], post_id, suffix, author_token)
        page.call("Page.reload")
        page.wait(
            "document.querySelector('#nav-notifications .badge')?.textContent === '1'",
            "the unread badge",
        )
        page.js("location.hash = '#/notifications'")
        page.wait(
            f"[...document.querySelectorAll('#notifications li.unread')].some(li => li.textContent.includes({json.dumps(other + ' commented on your post')}))",
            "the notification of the other user's comment",
        )
        page.js(f"location.hash = '#/posts/{post_id}'")
        page.wait("document.querySelectorAll('#thread-comments li').length === 2", "the thread again")
        if os.environ.get("TESSERA_KEEP_SCREENSHOTS"):
            print("screenshot:", page.screenshot(artifacts() / "web-front-end.png"))
    except BaseException:
        try:
            print("screenshot of the failure:", page.screenshot(artifacts() / "web-front-end-failure.png"))
        except Exception as shot_err:  # the browser may be what failed
            print("no screenshot:", shot_err)
        raise
    print(f"browser walk-through: {time.monotonic() - started:.1f}s")

    # What the page did is what the API holds.
    import ssl

    context = ssl.create_default_context(cafile=mesh["ca"])
    url = f"{page.base}/v1/posts/{post_id}/thread"
    with urllib.request.urlopen(url, context=context, timeout=10) as r:
        thread = json.load(r)
    assert thread["post"]["title"] == title
    assert thread["post"]["tags"] == ["web", "test"]
    assert thread["author"]["username"] == username
    assert [c["comment"]["body"] for c in thread["comments"]] == [
        "A comment from the browser.",
        "A comment from elsewhere.",
    ]
