// The live side of the web client: one WebSocket (`/ws`, subprotocol
// roomcast.v1.json, docs/websocket.md). Requests carry an id and are matched to
// their replies; pushes go to `onPush`. A lost connection is reopened with
// exponential backoff (and at once when the browser comes back online); the app
// resubscribes from the last sequence it showed, so nothing is lost.

import { RpcError, forget, freshToken, refresh } from "./api.js";

/** How long a request waits for its reply. */
const REQUEST_TIMEOUT_MS = 15000;
/** First and longest wait before reconnecting (doubled per failed attempt, with jitter). */
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 30000;
/** An application ping this often finds a connection that died without a close. */
const PING_INTERVAL_MS = 25000;

/** What each close code asks of the client (docs/websocket.md, "Close codes"). */
const CLOSE_REASONS = {
  1002: "the client broke the WebSocket protocol",
  1007: "the client sent invalid text",
  1009: "a frame was too large",
  4502: "too many malformed frames",
  4503: "you have too many open connections; close another tab",
  4504: "you were disconnected",
};

export class Live {
  constructor({ onPush, onState, onReady }) {
    Object.assign(this, { onPush, onState, onReady });
    this.ws = null;
    this.ready = false;
    this.stopped = true;
    this.attempt = 0;
    this.nextId = 1;
    this.pending = new Map();
    this.timer = 0;
    this.pinger = 0;
    addEventListener("offline", () => this.drop("offline"));
    addEventListener("online", () => { this.attempt = 0; this.open(); });
  }

  start() {
    this.stopped = false;
    this.attempt = 0;
    this.open();
  }

  stop() {
    this.stopped = true;
    this.drop("idle");
  }

  /** Sends `frame` (e.g. `{subscribe: {...}}`) and resolves with the reply's body. */
  request(frame) {
    const ws = this.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      return Promise.reject(Object.assign(new RpcError("unavailable", "not connected"), { lost: true }));
    }
    const id = String(this.nextId++);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(Object.assign(new RpcError("deadline_exceeded", "the server did not answer in time"), { lost: true }));
      }, REQUEST_TIMEOUT_MS);
      this.pending.set(id, { resolve, reject, timer });
      ws.send(JSON.stringify({ id, ...frame }));
    });
  }

  /** Tells the open connection about a refreshed token, so it outlives the old one. */
  reauthenticate(accessToken) {
    if (this.ready) this.request({ authenticate: { accessToken } }).catch(() => {});
  }

  open() {
    clearTimeout(this.timer);
    if (this.stopped || this.ws) return;
    if (!navigator.onLine) return this.onState("offline");
    this.onState("connecting");
    const url = new URL("/ws", location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(url, "roomcast.v1.json");
    this.ws = ws;
    ws.onmessage = (ev) => this.receive(ev.data);
    ws.onclose = (ev) => this.closed(ws, ev);
    ws.onopen = async () => {
      try {
        // The token goes in the first frame, not the URL, so it stays out of logs.
        await this.request({ authenticate: { accessToken: await freshToken() } });
      } catch {
        if (this.ws === ws) ws.close();
        return;
      }
      this.ready = true;
      this.attempt = 0;
      clearInterval(this.pinger);
      this.pinger = setInterval(() => this.request({ ping: {} }).catch((e) => {
        if (e.code === "deadline_exceeded" && this.ws === ws) this.drop("no answer to ping", true);
      }), PING_INTERVAL_MS);
      this.onState("live");
      this.onReady();
    };
  }

  receive(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    const id = frame.id ?? "0";
    delete frame.id;
    const [kind, body] = Object.entries(frame)[0] ?? [];
    if (String(id) === "0") return this.onPush(kind, body ?? {});
    const waiter = this.pending.get(String(id));
    if (!waiter) return;
    this.pending.delete(String(id));
    clearTimeout(waiter.timer);
    if (kind === "error") waiter.reject(new RpcError(body.code, body.message));
    else waiter.resolve(body ?? {});
  }

  /** Forgets the current socket at once (without waiting for a close handshake). */
  drop(state, reconnect = false) {
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onopen = null;
      ws.close();
    }
    this.lost();
    clearTimeout(this.timer);
    if (reconnect && !this.stopped) this.retry();
    else this.onState(state);
  }

  lost() {
    this.ready = false;
    clearInterval(this.pinger);
    for (const [id, waiter] of this.pending) {
      clearTimeout(waiter.timer);
      waiter.reject(Object.assign(new RpcError("unavailable", "connection lost"), { lost: true }));
      this.pending.delete(id);
    }
  }

  closed(ws, ev) {
    if (ws !== this.ws) return;
    this.ws = null;
    this.lost();
    if (this.stopped) return;
    if (ev.code === 4501) return forget("Your session was signed out.");
    if (ev.code === 4002 || ev.code === 4500) {
      // Expired (or refused) token: a fresh one, then back (resume covers the gap);
      // a refused one waits its backoff, so a server that keeps refusing is not hammered.
      this.onState("reconnecting");
      const back = ev.code === 4002 ? () => this.open() : () => this.retry();
      refresh().then(back, () => this.retry());
      return;
    }
    const reason = CLOSE_REASONS[ev.code] ?? (ev.code >= 4500 ? "disconnected by the server" : null);
    if (reason) return this.onState("stopped", ev.reason ? `${reason}: ${ev.reason}` : reason);
    this.retry();
  }

  retry() {
    if (this.stopped) return;
    const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** this.attempt) * (0.5 + Math.random() / 2);
    this.attempt += 1;
    this.onState("reconnecting");
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.open(), delay);
  }
}
