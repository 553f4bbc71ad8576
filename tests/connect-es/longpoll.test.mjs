// PushService.Poll (long-polling) with the connect-es client generated from
// src/proto/roomcast/v1/push.proto, in both codecs: a poll behind the room answers
// at once, a caught-up poll waits and wakes on a send, and a client that resumes
// from its cursors after an abandoned poll misses nothing and repeats nothing.
//
// Run by scripts/connect-es-test.sh (ROOMCAST_URL names a running server).
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { test } from "node:test";

import { createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";

import { AuthService } from "./gen/roomcast/v1/auth_pb.js";
import { PushService } from "./gen/roomcast/v1/push_pb.js";
import { RoomKind, RoomService } from "./gen/roomcast/v1/rooms_pb.js";

const baseUrl = process.env.ROOMCAST_URL;
if (!baseUrl) {
  throw new Error("set ROOMCAST_URL to a running roomcast server, e.g. http://127.0.0.1:8080");
}
const PASSWORD = "correct horse battery staple";
const WAIT_MS = 15_000;

function clientsFor(token, useBinaryFormat) {
  const transport = createConnectTransport({
    baseUrl,
    httpVersion: "1.1",
    useBinaryFormat,
    interceptors: [
      (next) => async (req) => {
        if (token.value) req.header.set("Authorization", `Bearer ${token.value}`);
        return next(req);
      },
    ],
  });
  return {
    auth: createClient(AuthService, transport),
    rooms: createClient(RoomService, transport),
    push: createClient(PushService, transport),
  };
}

async function account(prefix, useBinaryFormat) {
  const token = { value: "" };
  const clients = clientsFor(token, useBinaryFormat);
  const res = await clients.auth.signUp({
    username: `${prefix}_${randomBytes(5).toString("hex")}`,
    password: PASSWORD,
  });
  token.value = res.tokens.accessToken;
  return clients;
}

/** The message sequences of a poll's answer. */
function seqs(res) {
  return res.events.filter((f) => f.kind.case === "message").map((f) => Number(f.kind.value.seq));
}

for (const useBinaryFormat of [false, true]) {
  const codec = useBinaryFormat ? "binary" : "JSON";
  test(`long-poll (${codec}): answers at once, wakes on a send, resumes by cursor`, async () => {
    const alice = await account("lp_a", useBinaryFormat);
    const bob = await account("lp_b", useBinaryFormat);
    const { room } = await alice.rooms.createRoom({ title: "long-poll", kind: RoomKind.PUBLIC });
    await bob.rooms.joinRoom({ roomId: room.id });
    for (let i = 1; i <= 3; i++) await alice.rooms.sendMessage({ roomId: room.id, text: `m${i}` });

    // Behind: everything at once, in pages.
    let cursor = 0n;
    const seen = [];
    let res = await bob.push.poll({ rooms: [{ roomId: room.id, afterSeq: cursor }], limit: 2, waitMs: 10_000 });
    assert.deepEqual(seqs(res), [1, 2]);
    assert.equal(res.more, true);
    seen.push(...seqs(res));
    cursor = res.cursors[0].afterSeq;
    res = await bob.push.poll({ rooms: [{ roomId: room.id, afterSeq: cursor }], waitMs: 10_000 });
    assert.deepEqual(seqs(res), [3]);
    seen.push(...seqs(res));
    cursor = res.cursors[0].afterSeq;
    assert.equal(cursor, 3n);

    // Caught up: the poll waits until alice sends.
    const started = Date.now();
    const waiting = bob.push.poll({ rooms: [{ roomId: room.id, afterSeq: cursor }], waitMs: WAIT_MS, pollId: "tab" });
    await new Promise((r) => setTimeout(r, 200));
    await alice.rooms.sendMessage({ roomId: room.id, text: "wake up" });
    res = await waiting;
    assert.deepEqual(seqs(res), [4]);
    assert.ok(Date.now() - started < WAIT_MS / 2, "woken by the send, not by the timeout");
    seen.push(...seqs(res));
    cursor = res.cursors[0].afterSeq;

    // An abandoned poll (the client aborts it), sends meanwhile, then a resume
    // from the cursors: nothing missing, nothing repeated.
    const abort = new AbortController();
    const abandoned = bob.push
      .poll({ rooms: [{ roomId: room.id, afterSeq: cursor }], waitMs: WAIT_MS }, { signal: abort.signal })
      .catch(() => "aborted");
    await new Promise((r) => setTimeout(r, 100));
    abort.abort();
    assert.equal(await abandoned, "aborted");
    for (let i = 5; i <= 7; i++) await alice.rooms.sendMessage({ roomId: room.id, text: `m${i}` });
    res = await bob.push.poll({ rooms: [{ roomId: room.id, afterSeq: cursor }], waitMs: WAIT_MS });
    seen.push(...seqs(res));
    assert.deepEqual(seen, [1, 2, 3, 4, 5, 6, 7]);

    // Nothing new: an empty answer at the (short) wait, cursors unchanged.
    res = await bob.push.poll({ rooms: [{ roomId: room.id, afterSeq: res.cursors[0].afterSeq }], waitMs: 100 });
    assert.deepEqual(seqs(res), []);
    assert.equal(res.cursors[0].afterSeq, 7n);
  });
}
