// GET /sse with a real SSE client: the npm `eventsource` package (the WHATWG
// EventSource for Node). Accounts, the room and the messages are made with the
// connect-es client generated from src/proto. Checks: named events (`message`,
// `subscribed`, `close`), every message event carries an id, and a new
// EventSource that sends the last id as `Last-Event-ID` continues with no gap and
// no duplicate while senders race.
//
// Run by scripts/connect-es-test.sh (ROOMCAST_URL names a running server).
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { test } from "node:test";

import { createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { EventSource } from "eventsource";

import { AuthService } from "./gen/roomcast/v1/auth_pb.js";
import { RoomKind, RoomService } from "./gen/roomcast/v1/rooms_pb.js";

const baseUrl = process.env.ROOMCAST_URL;
if (!baseUrl) {
  throw new Error("set ROOMCAST_URL to a running roomcast server, e.g. http://127.0.0.1:8080");
}
const PASSWORD = "correct horse battery staple";
const WAIT_MS = 15_000;

function clientsFor(token) {
  const transport = createConnectTransport({
    baseUrl,
    httpVersion: "1.1",
    interceptors: [
      (next) => async (req) => {
        if (token.value) req.header.set("Authorization", `Bearer ${token.value}`);
        return next(req);
      },
    ],
  });
  return { auth: createClient(AuthService, transport), rooms: createClient(RoomService, transport) };
}

async function account(prefix) {
  const token = { value: "" };
  const clients = clientsFor(token);
  const res = await clients.auth.signUp({
    username: `${prefix}_${randomBytes(5).toString("hex")}`,
    password: PASSWORD,
  });
  token.value = res.tokens.accessToken;
  return { ...clients, token: token.value };
}

/** An EventSource collecting message sequences; `lastEventId` sent as a header. */
function open(roomId, token, lastEventId) {
  const url = `${baseUrl}/sse?rooms=${roomId}:0&access_token=${encodeURIComponent(token)}`;
  const es = new EventSource(url, {
    fetch: (input, init) =>
      fetch(input, {
        ...init,
        headers: { ...init.headers, ...(lastEventId ? { "Last-Event-ID": lastEventId } : {}) },
      }),
  });
  const state = { es, seqs: [], ids: [], subscribed: false, lastId: lastEventId };
  es.addEventListener("subscribed", () => {
    state.subscribed = true;
  });
  es.addEventListener("message", (e) => {
    const frame = JSON.parse(e.data);
    assert.ok(frame.message, `a message event carries a message frame: ${e.data}`);
    assert.ok(e.lastEventId, "a message event carries an id");
    state.seqs.push(Number(frame.message.seq));
    state.lastId = e.lastEventId;
  });
  return state;
}

async function until(check, what) {
  const deadline = Date.now() + WAIT_MS;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

test("eventsource: ids, event names and a Last-Event-ID resume under racing senders", async () => {
  const SENDERS = 4;
  const EACH = 20;
  const alice = await account("sse_a");
  const bob = await account("sse_b");
  const room = await alice.rooms.createRoom({ title: "sse", kind: RoomKind.PUBLIC });
  const roomId = room.room.id;
  await bob.rooms.joinRoom({ roomId });

  const first = open(roomId, bob.token);
  await until(() => first.subscribed, "subscribed");
  const senders = [];
  for (let s = 0; s < SENDERS; s++) {
    senders.push(
      (async () => {
        for (let i = 0; i < EACH; i++) {
          await alice.rooms.sendMessage({ roomId, text: `s${s}-${i}` });
        }
      })(),
    );
  }
  // Drop the stream mid-way, then resume from its last id while senders go on.
  await until(() => first.seqs.length >= 25, "25 messages");
  first.es.close();
  const seen = [...first.seqs];
  const second = open(roomId, bob.token, first.lastId);
  await Promise.all(senders);
  await until(() => seen.length + second.seqs.length >= SENDERS * EACH, "every message");
  await new Promise((r) => setTimeout(r, 300));
  second.es.close();
  const all = [...seen, ...second.seqs];
  assert.deepEqual(
    all,
    Array.from({ length: SENDERS * EACH }, (_, i) => i + 1),
    "one gapless sequence, nothing repeated",
  );
});
