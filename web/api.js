// The HTTP side of the web client: Connect unary calls with JSON over fetch
// (POST /roomcast.v1.<Service>/<Method>, docs/api.md) and the session: the token
// pair lives in sessionStorage (per tab; a reload keeps it) and the access token
// is refreshed with the refresh token shortly before it expires.

const STORAGE_KEY = "roomcast.session";
/** How long one call may take before the page gives up on it. */
const CALL_TIMEOUT_MS = 15000;
/** Refresh this long before the access token expires (at most a quarter of its life). */
const REFRESH_MARGIN_MS = 60000;
/** After a refresh that failed for another reason than a dead session, try again. */
const REFRESH_RETRY_MS = 5000;

/** A Connect error: `code` is the Connect code, `message` the server's text. */
export class RpcError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

let session = restore();
let refreshing = null;
let refreshTimer = 0;
const listeners = new Set();

function restore() {
  try {
    return JSON.parse(sessionStorage.getItem(STORAGE_KEY));
  } catch {
    return null;
  }
}

/** Calls `fn(session, reason)` on every change: signed-in, refreshed, or the end. */
export function onSession(fn) {
  listeners.add(fn);
}

/** The session: `{user, accessToken, refreshToken, expiresAt, lifetime}`, or null. */
export function current() {
  return session;
}

function store(next, reason) {
  session = next;
  if (next) sessionStorage.setItem(STORAGE_KEY, JSON.stringify(next));
  else sessionStorage.removeItem(STORAGE_KEY);
  schedule();
  for (const fn of listeners) fn(next, reason);
}

async function post(method, body, token) {
  const headers = {
    "Content-Type": "application/json",
    "Connect-Protocol-Version": "1",
    "Connect-Timeout-Ms": String(CALL_TIMEOUT_MS),
  };
  if (token) headers.Authorization = `Bearer ${token}`;
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), CALL_TIMEOUT_MS + 1000);
  try {
    const res = await fetch(`/roomcast.v1.${method}`, {
      method: "POST", headers, body: JSON.stringify(body ?? {}), signal: abort.signal,
    });
    const data = await res.json().catch(() => null);
    if (!res.ok) {
      throw new RpcError(data?.code ?? "unknown", data?.message ?? `HTTP ${res.status}`);
    }
    return { data: data ?? {}, serverNow: Date.parse(res.headers.get("Date")) };
  } catch (e) {
    if (e instanceof RpcError) throw e;
    throw new RpcError("unavailable", abort.signal.aborted
      ? "the server did not answer in time" : "cannot reach the server");
  } finally {
    clearTimeout(timer);
  }
}

// The token's lifetime is measured against the server's clock (its Date header),
// so a browser whose clock is off neither refreshes in a loop nor too late.
function sessionFrom(user, tokens, serverNow) {
  const now = Date.now();
  const lifetime = Date.parse(tokens.accessExpiresAt) - (Number.isFinite(serverNow) ? serverNow : now);
  return {
    user, accessToken: tokens.accessToken, refreshToken: tokens.refreshToken,
    expiresAt: now + lifetime, lifetime,
  };
}

export async function signIn(username, password) {
  const { data, serverNow } = await post("AuthService/SignIn", { username, password });
  store(sessionFrom(data.user, data.tokens, serverNow), "signed-in");
}

export async function signUp(username, password, displayName) {
  const { data, serverNow } = await post("AuthService/SignUp", { username, password, displayName });
  store(sessionFrom(data.user, data.tokens, serverNow), "signed-in");
}

/** Ends the session on the server and here (here even when the server is unreachable). */
export async function signOut() {
  try {
    if (session) await call("AuthService/SignOut", {});
  } catch {
    // The tokens are forgotten below all the same; an unreachable server lets the
    // refresh token lapse on its own.
  } finally {
    if (session) store(null, "Signed out.");
  }
}

/** Drops the session here, e.g. after the server closed the socket with 4501. */
export function forget(reason) {
  if (session) store(null, reason);
}

/** Exchanges the refresh token for a new pair; concurrent callers share one call. */
export function refresh() {
  if (!session) return Promise.reject(new RpcError("unauthenticated", "not signed in"));
  refreshing ??= (async () => {
    const used = session.refreshToken;
    try {
      const { data, serverNow } = await post("AuthService/Refresh", { refreshToken: used });
      if (session?.refreshToken === used) store(sessionFrom(session.user, data.tokens, serverNow), "refreshed");
    } catch (e) {
      if (e.code === "unauthenticated" && session?.refreshToken === used) {
        store(null, "Your session has ended; please sign in again.");
      }
      throw e;
    } finally {
      refreshing = null;
    }
  })();
  return refreshing;
}

/** An access token that is valid for a few more seconds at least. */
export async function freshToken() {
  if (session && session.expiresAt - Date.now() < 5000) await refresh();
  if (!session) throw new RpcError("unauthenticated", "not signed in");
  return session.accessToken;
}

function schedule() {
  clearTimeout(refreshTimer);
  if (!session) return;
  const margin = Math.min(REFRESH_MARGIN_MS, session.lifetime / 4);
  const delay = Math.max(session.expiresAt - Date.now() - margin, 1000);
  refreshTimer = setTimeout(() => refresh().catch((e) => {
    if (e.code !== "unauthenticated") refreshTimer = setTimeout(schedule, REFRESH_RETRY_MS);
  }), delay);
}
schedule();

/** Calls `Service/Method` as the signed-in user; refreshes once on `unauthenticated`. */
export async function call(method, body) {
  const token = session ? await freshToken() : undefined;
  try {
    return (await post(method, body, token)).data;
  } catch (e) {
    if (e.code !== "unauthenticated" || !session) throw e;
    await refresh();
    return (await post(method, body, session.accessToken)).data;
  }
}
