// Tessera's web front end: plain JavaScript over the public JSON API (see /openapi.json).
// Everything shown is set with textContent, never as HTML, so posts cannot inject markup.
"use strict";

const state = {
  token: localStorage.getItem("tessera.token"),
  // Access tokens live minutes; the refresh token (single use) gets the next pair.
  refresh: localStorage.getItem("tessera.refresh"),
  user: JSON.parse(localStorage.getItem("tessera.user") || "null"),
  nextPageToken: "",
  currentPost: null,
};

function send(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  if (state.token) headers["authorization"] = "Bearer " + state.token;
  return fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
}

// One refresh at a time: calls that find the access token expired together wait for it, since
// a refresh token presented twice ends the session.
let refreshing = null;
function refreshSession() {
  if (!refreshing) {
    const token = state.refresh;
    refreshing = fetch("/v1/auth/refresh", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ refreshToken: token }),
    })
      .then(async (resp) => {
        if (!resp.ok) return false;
        const r = await resp.json();
        state.token = r.accessToken;
        state.refresh = r.refreshToken;
        localStorage.setItem("tessera.token", state.token);
        localStorage.setItem("tessera.refresh", state.refresh);
        return true;
      })
      .catch(() => false)
      .finally(() => {
        refreshing = null;
      });
  }
  return refreshing;
}

// One JSON call. Errors come back as {code, message, details} with an HTTP status. An expired
// access token is refreshed once and the call sent again.
async function api(method, path, body) {
  const sentWith = state.token;
  let resp = await send(method, path, body);
  if (resp.status === 401 && sentWith && state.refresh) {
    if (state.token !== sentWith || (await refreshSession())) resp = await send(method, path, body);
  }
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    if (resp.status === 401 && state.token) signOut();
    const violations = (data.details || [])
      .flatMap((d) => d.fieldViolations || [])
      .map((v) => v.field + " " + v.description);
    const err = new Error(violations.length ? violations.join("; ") : data.message || resp.statusText);
    err.status = resp.status;
    throw err;
  }
  return data;
}

const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const c of children) node.append(c);
  return node;
}

function flash(message, ok) {
  const f = $("flash");
  f.textContent = message;
  f.classList.toggle("ok", !!ok);
  f.hidden = !message;
}

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

function signIn(login) {
  state.token = login.accessToken;
  state.refresh = login.refreshToken || null;
  state.user = login.user;
  localStorage.setItem("tessera.token", state.token);
  if (state.refresh) localStorage.setItem("tessera.refresh", state.refresh);
  localStorage.setItem("tessera.user", JSON.stringify(state.user));
}

function signOut() {
  state.token = null;
  state.refresh = null;
  state.user = null;
  localStorage.removeItem("tessera.token");
  localStorage.removeItem("tessera.refresh");
  localStorage.removeItem("tessera.user");
  renderAuth();
}

function renderAuth() {
  const inside = !!state.token;
  for (const node of document.querySelectorAll("[data-auth]")) {
    node.hidden = (node.dataset.auth === "in") !== inside;
  }
  $("me").textContent = inside && state.user ? "@" + state.user.username : "";
  if (inside) refreshUnread();
}

async function refreshUnread() {
  try {
    const r = await api("GET", "/v1/notifications?pageSize=1&unreadOnly=true");
    const n = Number(r.unreadCount || 0);
    const link = $("nav-notifications");
    link.textContent = "Notifications";
    if (n > 0) link.append(el("span", { className: "badge", textContent: String(n) }));
  } catch (_) {
    // The badge is a nicety; the page works without it.
  }
}

// Display names by user id, fetched in batches with BatchGetUsers.
const names = new Map();
async function loadNames(ids) {
  const missing = [...new Set(ids)].filter((id) => id && !names.has(id));
  if (!missing.length) return;
  const query = missing.map((id) => "userIds=" + encodeURIComponent(id)).join("&");
  const r = await api("GET", "/v1/users:batchGet?" + query);
  for (const u of r.users || []) names.set(u.userId, u.displayName || u.username);
}
const nameOf = (id) => names.get(id) || "someone";

function show(view) {
  for (const s of document.querySelectorAll("main > section")) s.hidden = s.id !== "view-" + view;
}

async function latest(append) {
  show("latest");
  const token = append ? state.nextPageToken : "";
  const r = await api("GET", "/v1/posts?pageSize=20" + (token ? "&pageToken=" + encodeURIComponent(token) : ""));
  const posts = r.posts || [];
  await loadNames(posts.map((p) => p.authorId));
  const list = $("posts");
  if (!append) list.replaceChildren();
  if (!posts.length && !append) list.append(el("li", { className: "hint", textContent: "No posts yet. Be the first." }));
  for (const p of posts) {
    list.append(
      el(
        "li",
        {},
        el("a", { className: "title", href: "#/posts/" + encodeURIComponent(p.postId), textContent: p.title }),
        el("div", { className: "meta", textContent: nameOf(p.authorId) + " · " + when(p.createTime) }),
        tags(p.tags),
      ),
    );
  }
  state.nextPageToken = r.nextPageToken || "";
  $("more").hidden = !state.nextPageToken;
}

function tags(list) {
  const span = el("div", {});
  for (const t of list || []) span.append(el("span", { className: "tag", textContent: t }));
  return span;
}

async function thread(postId) {
  show("thread");
  state.currentPost = postId;
  const r = await api("GET", "/v1/posts/" + encodeURIComponent(postId) + "/thread?commentPageSize=100");
  const p = r.post;
  const author = r.author ? r.author.displayName || r.author.username : "someone";
  $("thread-post").replaceChildren(
    el("h1", { textContent: p.title }),
    el("div", { className: "meta", textContent: "by " + author + " · " + when(p.createTime) }),
    tags(p.tags),
    el("p", { className: "text", textContent: p.body }),
  );
  const list = $("thread-comments");
  list.replaceChildren();
  const comments = r.comments || [];
  if (!comments.length) list.append(el("li", { className: "hint", textContent: "No comments yet." }));
  for (const c of comments) {
    const who = c.author ? c.author.displayName || c.author.username : "someone";
    list.append(
      el(
        "li",
        {},
        el("div", { className: "meta", textContent: who + " · " + when(c.comment.createTime) }),
        el("p", { className: "text", textContent: c.comment.body }),
      ),
    );
  }
}

async function notifications() {
  show("notifications");
  if (!state.token) return route("#/login");
  const r = await api("GET", "/v1/notifications?pageSize=50");
  const items = r.notifications || [];
  await loadNames(items.map((n) => n.actorId));
  const list = $("notifications");
  list.replaceChildren();
  if (!items.length) list.append(el("li", { className: "hint", textContent: "Nothing yet." }));
  for (const n of items) {
    list.append(
      el(
        "li",
        { className: n.read ? "" : "unread" },
        el("a", {
          href: "#/posts/" + encodeURIComponent(n.postId),
          textContent: nameOf(n.actorId) + " commented on your post",
        }),
        el("div", { className: "meta", textContent: when(n.createTime) }),
      ),
    );
  }
}

async function route(hash) {
  if (hash !== undefined && location.hash !== hash) {
    location.hash = hash;
    return;
  }
  flash("");
  const h = location.hash || "#/";
  try {
    if (h.startsWith("#/posts/")) await thread(decodeURIComponent(h.slice("#/posts/".length)));
    else if (h === "#/new") show(state.token ? "new" : "login");
    else if (h === "#/signup") show("signup");
    else if (h === "#/login") show("login");
    else if (h === "#/notifications") await notifications();
    else await latest(false);
  } catch (e) {
    flash(e.message);
  }
}

function form(id, handler) {
  $(id).addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = event.target.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      await handler(Object.fromEntries(new FormData(event.target)));
      event.target.reset();
    } catch (e) {
      flash(e.message);
    } finally {
      button.disabled = false;
    }
  });
}

form("signup-form", async (f) => {
  await api("POST", "/v1/users", {
    username: f.username,
    displayName: f.displayName,
    email: f.email,
    password: f.password,
    requestId: crypto.randomUUID ? crypto.randomUUID() : String(Date.now()),
  });
  signIn(await api("POST", "/v1/auth/login", { username: f.username, password: f.password }));
  renderAuth();
  await route("#/");
  flash("Welcome, " + state.user.displayName + "!", true);
});

form("login-form", async (f) => {
  signIn(await api("POST", "/v1/auth/login", { username: f.username, password: f.password }));
  renderAuth();
  await route("#/");
});

form("post-form", async (f) => {
  const tagList = (f.tags || "").split(",").map((t) => t.trim()).filter(Boolean);
  const r = await api("POST", "/v1/posts", { title: f.title, body: f.body, tags: tagList });
  await route("#/posts/" + encodeURIComponent(r.post.postId));
});

form("comment-form", async (f) => {
  await api("POST", "/v1/posts/" + encodeURIComponent(state.currentPost) + "/comments", { body: f.body });
  await thread(state.currentPost);
});

$("logout").addEventListener("click", () => {
  // Ends the session on the server too (its refresh token can no longer be used).
  if (state.refresh) {
    fetch("/v1/auth/logout", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ refreshToken: state.refresh }),
    }).catch(() => {});
  }
  signOut();
  route("#/");
});
$("more").addEventListener("click", () => latest(true).catch((e) => flash(e.message)));
$("mark-read").addEventListener("click", async () => {
  try {
    await api("POST", "/v1/notifications:markRead", {});
    await notifications();
    refreshUnread();
  } catch (e) {
    flash(e.message);
  }
});
window.addEventListener("hashchange", () => route());

renderAuth();
route();
