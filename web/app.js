// roomcast's bundled web client: sign-in, rooms, history and live chat through
// the public API only (api.js for Connect calls, live.js for the WebSocket).
// All user text goes into the page as text nodes (textContent, append(string)),
// never as HTML.

import * as api from "./api.js";
import { Live } from "./live.js";

/** Events per history page. */
const PAGE = 50;
/** Above any room's last sequence: ListMessages' "the newest page". */
const NEWEST = "18446744073709551615";
/** Send "typing" at most this often while the user types; show others' this long. */
const TYPING_EVERY_MS = 3000;
const TYPING_SHOWN_MS = 5000;
/** Wait before retrying a send the server asked to retry (unavailable, rate limit). */
const SEND_RETRY_MS = 2000;
const SEND_MAX_ATTEMPTS = 8;

const $ = (id) => document.getElementById(id);
const state = {
  me: null,
  rooms: new Map(), // id -> Room, mine and public
  names: new Map(), // user id -> display name
  room: null, // the open room
  outbox: [], // sends not yet seen back in the room: {roomId, cmid, text, status, attempts, el}
};

/** An element with attributes and children; strings become text nodes. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  el.append(...children.filter((c) => c != null));
  return el;
}

function showError(e) {
  $("banner-text").textContent = e?.message ?? String(e);
  $("banner").hidden = false;
}

/** Runs `fn`, showing a failure's message; used for every user action. */
async function attempt(fn) {
  try {
    return await fn();
  } catch (e) {
    showError(e);
    return undefined;
  }
}

// ------------------------------------------------------------------ connection

const STATE_TEXT = {
  connecting: "connecting…", live: "live", reconnecting: "reconnecting…",
  offline: "offline", "catching-up": "catching up…", stopped: "disconnected",
};

function setStatus(name, detail) {
  const el = $("status");
  el.dataset.state = name;
  el.textContent = STATE_TEXT[name] ?? name;
  el.hidden = !state.me;
  if (name === "stopped") {
    el.replaceChildren(STATE_TEXT.stopped, " ", h("button", { type: "button", onclick: () => live.start() }, "Reconnect"));
    if (detail) showError(new Error(`Disconnected: ${detail}`));
  }
}

const live = new Live({
  onState: setStatus,
  onPush,
  onReady() {
    if (state.room) subscribe(state.room);
    flushOutbox();
    attempt(loadRooms);
  },
});

api.onSession((session, reason) => {
  if (session && reason === "refreshed") live.reauthenticate(session.accessToken);
  else if (session) enterChat();
  else leaveChat(reason);
});

// ------------------------------------------------------------------ sign-in

$("auth-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const form = ev.target;
  const [username, password, displayName] = ["username", "password", "displayName"].map((n) => form.elements[n].value);
  const buttons = form.querySelectorAll("button");
  $("auth-error").textContent = "";
  buttons.forEach((b) => { b.disabled = true; });
  try {
    if (ev.submitter?.value === "signup") await api.signUp(username, password, displayName);
    else await api.signIn(username, password);
    form.reset();
  } catch (e) {
    $("auth-error").textContent = e.message;
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
});

$("sign-out").addEventListener("click", () => attempt(api.signOut));
$("banner-close").addEventListener("click", () => { $("banner").hidden = true; });

function enterChat() {
  state.me = api.current().user;
  state.names.set(state.me.id, state.me.displayName);
  $("me").textContent = state.me.displayName;
  $("auth-view").hidden = true;
  $("chat-view").hidden = false;
  $("sign-out").hidden = false;
  live.start();
  attempt(loadRooms);
  const id = new URLSearchParams(location.hash.slice(1)).get("room");
  if (id) openRoom(id);
}

function leaveChat(reason) {
  live.stop();
  closeRoom();
  Object.assign(state, { me: null, room: null, outbox: [] });
  state.rooms.clear();
  $("me").textContent = "";
  $("status").hidden = true;
  $("sign-out").hidden = true;
  $("chat-view").hidden = true;
  $("auth-view").hidden = false;
  $("auth-error").textContent = reason === "Signed out." ? "" : reason ?? "";
  history.replaceState(null, "", location.pathname);
}

// ------------------------------------------------------------------ rooms

const isMember = (room) => Boolean(room?.myRole) && room.myRole !== "MEMBER_ROLE_UNSPECIFIED";

async function loadRooms() {
  const [mine, open] = await Promise.all([
    api.call("RoomService/ListRooms", { filter: "ROOM_FILTER_MINE", pageSize: 100 }),
    api.call("RoomService/ListRooms", { filter: "ROOM_FILTER_PUBLIC", pageSize: 100 }),
  ]);
  state.rooms.clear();
  for (const room of [...(open.rooms ?? []), ...(mine.rooms ?? [])]) state.rooms.set(room.id, room);
  renderRooms();
}

function renderRooms() {
  const item = (room, join) => h("li", { "data-room": room.id, class: state.room?.id === room.id ? "current" : null },
    h("button", { type: "button", class: "link", onclick: () => openRoom(room.id) }, room.title || "(untitled)"),
    Number(room.unreadCount) > 0 ? h("span", { class: "badge" }, String(room.unreadCount)) : null,
    join ? h("button", { type: "button", class: "join", onclick: () => joinRoom(room.id) }, "Join") : null);
  const rooms = [...state.rooms.values()];
  $("my-rooms").replaceChildren(...rooms.filter(isMember).map((r) => item(r, false)));
  $("public-rooms").replaceChildren(...rooms
    .filter((r) => !isMember(r) && (r.kind === "ROOM_KIND_PUBLIC" || r.kind === "ROOM_KIND_BROADCAST"))
    .map((r) => item(r, true)));
}

$("create-room").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const f = ev.target.elements;
  attempt(async () => {
    const { room } = await api.call("RoomService/CreateRoom", { kind: f.kind.value, title: f.title.value, topic: f.topic.value });
    ev.target.reset();
    state.rooms.set(room.id, room);
    renderRooms();
    await openRoom(room.id);
  });
});

function joinRoom(id) {
  return attempt(async () => {
    const { room } = await api.call("RoomService/JoinRoom", { roomId: id });
    state.rooms.set(room.id, room);
    renderRooms();
    if (state.room?.id === id) {
      state.room.info = room;
      renderRoomHead();
      loadMembers(state.room);
    } else await openRoom(id);
  });
}

$("join").addEventListener("click", () => joinRoom(state.room.id));
$("leave").addEventListener("click", () => attempt(() => api.call("RoomService/LeaveRoom", { roomId: state.room.id })));
$("back").addEventListener("click", () => closeRoom());

// ------------------------------------------------------------------ one room

function closeRoom() {
  const room = state.room;
  if (room?.subscribed && live.ready) live.request({ unsubscribe: { roomId: room.id } }).catch(() => {});
  state.room = null;
  state.outbox = state.outbox.filter((item) => item.status !== "acked");
  $("room").hidden = true;
  $("no-room").hidden = false;
  $("chat-view").classList.remove("in-room");
  if (state.me) history.replaceState(null, "", location.pathname);
  renderRooms();
}

async function openRoom(id) {
  if (state.room?.id === id) return;
  closeRoom();
  const room = { id, info: null, cursor: 0, oldest: 0, hasMore: false, subscribed: false, lastRead: 0, members: new Map(), typing: new Map() };
  state.room = room;
  history.replaceState(null, "", `#room=${encodeURIComponent(id)}`);
  $("messages").replaceChildren();
  $("outbox").replaceChildren(...state.outbox.filter((i) => i.roomId === id).map((i) => i.el));
  $("typing").textContent = "";
  $("members").replaceChildren();
  $("room").hidden = false;
  $("no-room").hidden = true;
  $("chat-view").classList.add("in-room");
  renderRooms();
  try {
    const [{ room: info }, page] = await Promise.all([
      api.call("RoomService/GetRoom", { roomId: id }),
      api.call("RoomService/ListMessages", { roomId: id, beforeSeq: NEWEST, limit: PAGE }),
    ]);
    if (state.room !== room) return;
    room.info = info;
    room.lastRead = Number(info.lastReadSeq ?? 0);
    renderRoomHead();
    showPage(room, page, false);
    scrollToEnd();
    loadMembers(room);
    subscribe(room);
  } catch (e) {
    if (state.room === room) closeRoom();
    showError(e);
  }
}

function renderRoomHead() {
  const info = state.room.info;
  $("room-title").textContent = info.title || "(untitled)";
  $("room-topic").textContent = info.topic ?? "";
  $("join").hidden = isMember(info);
  $("leave").hidden = !isMember(info);
  $("composer").hidden = !isMember(info);
}

/** Starts (or resumes) live delivery after the last event shown. */
function subscribe(room) {
  if (!live.ready || !room.info) return;
  room.subscribed = false;
  live.request({ subscribe: { roomId: room.id, sinceSeq: String(room.cursor) } }).then(
    () => { room.subscribed = true; },
    (e) => {
      if (state.room !== room || e.lost) return;
      if (e.code === "already_exists") room.subscribed = true;
      else showError(e);
    });
}

/** Shows a ListMessages page: appended at start, prepended for older pages. */
function showPage(room, page, older) {
  const events = page.messages ?? [];
  // History shows each TEXT message in its current state, so edits and deletions
  // of it need no rows of their own.
  const rows = events.filter((m) => m.kind === "MESSAGE_KIND_TEXT").map(messageRow);
  if (older) $("messages").prepend(...rows);
  else $("messages").append(...rows);
  if (events.length) {
    room.oldest = Number(events[0].seq);
    if (!older) room.cursor = Number(events[events.length - 1].seq);
  }
  room.hasMore = Boolean(page.hasMore);
  $("load-older").hidden = !room.hasMore;
}

async function loadOlder() {
  const room = state.room;
  if (!room || room.loading || !room.hasMore) return;
  room.loading = true;
  try {
    const page = await api.call("RoomService/ListMessages", { roomId: room.id, beforeSeq: String(room.oldest), limit: PAGE });
    if (state.room !== room) return;
    const scroller = $("scroller");
    const fromEnd = scroller.scrollHeight - scroller.scrollTop;
    showPage(room, page, true);
    scroller.scrollTop = scroller.scrollHeight - fromEnd;
  } catch (e) {
    showError(e);
  } finally {
    room.loading = false;
  }
}

$("load-older").addEventListener("click", loadOlder);
$("scroller").addEventListener("scroll", () => {
  if ($("scroller").scrollTop < 40) loadOlder();
  if (atEnd()) markRead();
});

const atEnd = () => { const s = $("scroller"); return s.scrollHeight - s.scrollTop - s.clientHeight < 60; };
const scrollToEnd = () => { const s = $("scroller"); s.scrollTop = s.scrollHeight; };

function timeText(iso) {
  const at = new Date(iso);
  return Number.isNaN(at.getTime()) ? "" : at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function messageRow(m) {
  const row = h("li", { class: m.senderId === state.me.id ? "msg mine" : "msg", "data-seq": m.seq },
    h("span", { class: "author", "data-user": m.senderId }, userName(m.senderId)),
    h("time", { datetime: m.createdAt }, timeText(m.createdAt)),
    h("span", { class: "text" }, m.text ?? ""),
    h("span", { class: "edited" }, m.editedAt ? "(edited)" : ""));
  if (m.deleted) markDeleted(row);
  return row;
}

function markDeleted(row) {
  row.classList.add("deleted");
  row.querySelector(".text").textContent = "message deleted";
  row.querySelector(".edited").textContent = "";
}

/** A history event pushed live (or replayed on resume), in sequence order. */
function applyEvent(kind, m) {
  const room = state.room;
  if (!room || m.roomId !== room.id) return;
  const seq = Number(m.seq);
  if (seq <= room.cursor) return; // shown already (from the history page or a replay)
  room.cursor = seq;
  const follow = atEnd();
  if (kind === "message") {
    const mine = state.outbox.find((i) => i.cmid && i.cmid === m.clientMessageId && m.senderId === state.me.id);
    if (mine) {
      mine.el.remove();
      state.outbox.splice(state.outbox.indexOf(mine), 1);
    }
    room.typing.delete(m.senderId);
    renderTyping();
    $("messages").append(messageRow(m));
  } else {
    const target = $("messages").querySelector(`li[data-seq="${CSS.escape(String(m.targetSeq))}"]`);
    if (target && kind === "edited") {
      target.querySelector(".text").textContent = m.text ?? "";
      target.querySelector(".edited").textContent = "(edited)";
    } else if (target) markDeleted(target);
  }
  if (follow) scrollToEnd();
  markRead();
}

function notice(text) {
  $("messages").append(h("li", { class: "notice" }, text));
}

function onPush(kind, body) {
  const room = state.room;
  const here = room && body.roomId === room.id;
  switch (kind) {
    case "message": case "edited": case "deleted":
      return applyEvent(kind, body);
    case "gap":
      if (here && Number(body.toSeq) > room.cursor) {
        room.cursor = Number(body.toSeq);
        notice(`Messages ${body.fromSeq}–${body.toSeq} were removed by the room's retention.`);
      }
      return;
    case "lagging":
      if (here) setStatus("catching-up");
      return;
    case "resumed":
      if (here && live.ready) setStatus("live");
      return;
    case "typing":
      if (here && body.userId !== state.me.id) {
        room.typing.set(body.userId, Date.now() + TYPING_SHOWN_MS);
        renderTyping();
        setTimeout(renderTyping, TYPING_SHOWN_MS + 100);
      }
      return;
    case "presence":
      if (here && room.members.has(body.userId)) {
        room.members.get(body.userId).online = Boolean(body.online);
        renderMembers(room);
      }
      return;
    case "member":
      if (here) loadMembers(room);
      return;
    case "roomUpdated":
      if (here) {
        room.info = { ...room.info, title: body.title, topic: body.topic };
        renderRoomHead();
      }
      return;
    case "removed":
      if (here) {
        closeRoom();
        if (body.reason !== "REMOVED_REASON_LEFT") showError(new Error(body.message || "You were removed from the room."));
      }
      attempt(loadRooms);
      return;
    case "error":
      // A subscription that ended after its reply (docs/websocket.md): say why, and
      // subscribe again unless access is gone.
      if (here) {
        showError(new Error(body.message));
        if (body.code === "permission_denied" || body.code === "not_found") closeRoom();
        else setTimeout(() => state.room === room && subscribe(room), SEND_RETRY_MS);
      }
      return;
    case "announcement":
      showError(new Error(`Announcement: ${body.text}`));
      return;
    default:
  }
}

// ------------------------------------------------------------------ people

function userName(id) {
  if (state.names.has(id)) return state.names.get(id);
  queueNameLookup(id);
  return id;
}

const unknownNames = new Set();
let lookupTimer = 0;
function queueNameLookup(id) {
  unknownNames.add(id);
  clearTimeout(lookupTimer);
  lookupTimer = setTimeout(async () => {
    const ids = [...unknownNames].slice(0, 100);
    ids.forEach((i) => unknownNames.delete(i));
    const reply = await api.call("UserService/BatchGetUsers", { ids }).catch(() => null);
    for (const user of reply?.users ?? []) rememberName(user);
  }, 50);
}

function rememberName(user) {
  state.names.set(user.id, user.displayName || user.username || user.id);
  for (const el of document.querySelectorAll(`[data-user="${CSS.escape(user.id)}"]`)) {
    el.textContent = state.names.get(user.id);
  }
}

async function loadMembers(room) {
  const reply = await api.call("RoomService/ListMembers", { roomId: room.id, pageSize: 100 }).catch(() => null);
  if (!reply || state.room !== room) return;
  room.members.clear();
  for (const member of reply.members ?? []) {
    if (member.user) rememberName(member.user);
    room.members.set(member.userId, { online: Boolean(member.online) });
  }
  renderMembers(room);
}

function renderMembers(room) {
  $("members").replaceChildren(...[...room.members].map(([id, m]) =>
    h("li", { class: m.online ? "online" : "offline", "data-user": id, title: m.online ? "online" : "offline" }, userName(id))));
}

function renderTyping() {
  const room = state.room;
  if (!room) return;
  const now = Date.now();
  for (const [id, until] of room.typing) if (until <= now) room.typing.delete(id);
  const names = [...room.typing.keys()].map(userName);
  $("typing").textContent = names.length === 0 ? ""
    : `${names.join(", ")} ${names.length === 1 ? "is" : "are"} typing…`;
}

// ------------------------------------------------------------------ sending

let lastTyping = 0;
let readTimer = 0;

function markRead() {
  clearTimeout(readTimer);
  readTimer = setTimeout(() => {
    const room = state.room;
    if (!room || !isMember(room.info) || !live.ready || document.visibilityState !== "visible" || !atEnd()) return;
    if (room.cursor <= room.lastRead) return;
    live.request({ markRead: { roomId: room.id, seq: String(room.cursor) } }).then((reply) => {
      room.lastRead = Number(reply.lastReadSeq ?? 0);
      const listed = state.rooms.get(room.id);
      if (listed) {
        listed.unreadCount = reply.unreadCount ?? "0";
        renderRooms();
      }
    }, () => {});
  }, 500);
}
document.addEventListener("visibilitychange", markRead);

const composer = $("composer");
composer.elements.text.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    composer.requestSubmit();
  }
});
composer.elements.text.addEventListener("input", () => {
  const room = state.room;
  if (!room?.subscribed || !live.ready || Date.now() - lastTyping < TYPING_EVERY_MS) return;
  lastTyping = Date.now();
  live.request({ typing: { roomId: room.id } }).catch(() => {});
});

composer.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = composer.elements.text.value;
  if (!text.trim() || !state.room) return;
  const random = crypto.getRandomValues(new Uint8Array(12));
  const item = {
    roomId: state.room.id,
    cmid: `web-${Array.from(random, (b) => b.toString(16).padStart(2, "0")).join("")}`,
    text, status: "queued", attempts: 0,
  };
  item.el = h("li", { class: "msg mine pending", "data-cmid": item.cmid },
    h("span", { class: "author" }, state.me.displayName),
    h("span", { class: "state" }, "sending…"),
    h("span", { class: "text" }, text));
  state.outbox.push(item);
  $("outbox").append(item.el);
  composer.reset();
  lastTyping = 0; // the others stop showing "typing" when this arrives
  scrollToEnd();
  flushOutbox();
});

/** Sends what waits; a retry reuses the client_message_id, so nothing is stored twice. */
function flushOutbox() {
  if (!live.ready) return;
  for (const item of state.outbox) {
    if (item.status !== "queued") continue;
    item.status = "sending";
    live.request({ send: { roomId: item.roomId, text: item.text, clientMessageId: item.cmid } }).then(() => {
      // Acknowledged (stored); the row stays until the event itself arrives, in order.
      item.status = "acked";
      item.el.classList.add("acked");
      item.el.querySelector(".state").textContent = "sent";
      if (state.room?.id !== item.roomId) state.outbox = state.outbox.filter((i) => i !== item);
    }, (e) => {
      const retry = e.lost || e.code === "unavailable" || e.code === "resource_exhausted";
      if (!e.lost) item.attempts += 1;
      if (retry && item.attempts < SEND_MAX_ATTEMPTS) {
        item.status = "queued";
        if (!e.lost) setTimeout(flushOutbox, SEND_RETRY_MS);
        return;
      }
      item.status = "failed";
      item.el.classList.add("failed");
      item.el.querySelector(".state").replaceChildren(`not sent: ${e.message} `,
        h("button", { type: "button", class: "link", onclick: () => discard(item) }, "dismiss"));
      showError(e);
    });
  }
}

function discard(item) {
  item.el.remove();
  state.outbox = state.outbox.filter((i) => i !== item);
}

// ------------------------------------------------------------------ start

if (api.current()) enterChat();
else leaveChat("");
