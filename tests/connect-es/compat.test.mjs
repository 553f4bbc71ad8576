// End-to-end compatibility: a connect-es client generated from src/proto (by
// `buf generate` with protoc-gen-es into ./gen) calls a running roomcast server,
// unchanged, over the Connect protocol with both codecs (JSON and binary protobuf).
//
// Run by scripts/connect-es-test.sh, which installs the pinned packages, generates
// the code, starts a server and sets ROOMCAST_URL. By hand, against a server you
// started yourself (with a generous realtime.send_rate_per_sec):
//
//     cd tests/connect-es && npm ci && npx buf generate
//     ROOMCAST_URL=http://127.0.0.1:8080 node --test
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { describe, test } from "node:test";

import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { timestampDate } from "@bufbuild/protobuf/wkt";

import { AuthService } from "./gen/roomcast/v1/auth_pb.js";
import { Role } from "./gen/roomcast/v1/common_pb.js";
import { MessageKind, RoomKind, RoomService } from "./gen/roomcast/v1/rooms_pb.js";
import { UserService } from "./gen/roomcast/v1/users_pb.js";

const baseUrl = process.env.ROOMCAST_URL;
if (!baseUrl) {
  throw new Error("set ROOMCAST_URL to a running roomcast server, e.g. http://127.0.0.1:8080");
}

const PASSWORD = "correct horse battery staple";

/** A username that is new on every run: 3-32 of [a-z0-9_.-]. */
function uniqueUsername(tag) {
  return `ces_${tag}_${Date.now().toString(36)}${randomBytes(3).toString("hex")}`;
}

const DAY_MS = 24 * 3600 * 1000;

/**
 * A Timestamp that was decoded into a real point in time: by default within a day
 * of now (creation times), or up to `maxFutureDays` ahead (expiry times).
 */
function assertTimestamp(ts, what, { maxFutureDays = 1 } = {}) {
  assert.ok(ts, `${what} is set`);
  assert.equal(ts.$typeName, "google.protobuf.Timestamp", `${what} is a Timestamp`);
  assert.equal(typeof ts.seconds, "bigint", `${what}.seconds is an int64 (bigint)`);
  assert.ok(ts.seconds > 0n, `${what}.seconds > 0 (got ${ts.seconds})`);
  assert.ok(ts.nanos >= 0 && ts.nanos < 1e9, `${what}.nanos in range (got ${ts.nanos})`);
  const at = timestampDate(ts).getTime();
  const now = Date.now();
  assert.ok(
    at > now - DAY_MS && at < now + maxFutureDays * DAY_MS,
    `${what} is a plausible time (${new Date(at).toISOString()})`,
  );
}

/** Runs `call`, which must fail with a ConnectError of `code`; returns the error. */
async function expectConnectError(call, code) {
  let caught;
  try {
    await call();
  } catch (e) {
    caught = e;
  }
  assert.ok(caught, `expected a ConnectError with code ${Code[code]}, but the call succeeded`);
  assert.ok(caught instanceof ConnectError, `expected a ConnectError, got ${caught}`);
  assert.equal(caught.code, code, `expected code ${Code[code]}, got ${Code[caught.code]}: ${caught.rawMessage}`);
  assert.equal(typeof caught.rawMessage, "string");
  assert.ok(caught.rawMessage.length > 0, "the error carries the server's message");
  return caught;
}

for (const useBinaryFormat of [false, true]) {
  const codec = useBinaryFormat ? "binary" : "json";
  const wantContentType = useBinaryFormat ? "application/proto" : "application/json";

  describe(`connect-es over ${codec} (useBinaryFormat: ${useBinaryFormat})`, () => {
    /** The current access token; the interceptor sends it when set. */
    let accessToken = "";
    /** What went over the wire, to prove the codec: content types of the last call. */
    const seen = { requestType: "", responseType: "" };

    const transport = createConnectTransport({
      baseUrl,
      httpVersion: "1.1",
      useBinaryFormat,
      interceptors: [
        (next) => async (req) => {
          if (accessToken) {
            req.header.set("Authorization", `Bearer ${accessToken}`);
          }
          seen.requestType = req.header.get("Content-Type") ?? "";
          seen.responseType = "";
          const res = await next(req);
          seen.responseType = res.header.get("Content-Type") ?? "";
          return res;
        },
      ],
    });
    const auth = createClient(AuthService, transport);
    const users = createClient(UserService, transport);
    const rooms = createClient(RoomService, transport);

    /** After a successful call: both directions used this codec. */
    function assertCodec() {
      assert.equal(seen.requestType, wantContentType, "request Content-Type");
      assert.equal(seen.responseType, wantContentType, "response Content-Type");
    }

    const username = uniqueUsername(useBinaryFormat ? "b" : "j");
    let userId = "";
    let roomId = "";
    let firstSeq = 0n;

    test("SignUp creates an account and returns a token pair", async () => {
      const res = await auth.signUp({ username, password: PASSWORD, displayName: "Compat Tester" });
      userId = res.user?.id ?? "";
      assertCodec();
      assert.equal(res.$typeName, "roomcast.v1.SignUpResponse");
      assert.ok(res.user, "user is set");
      assert.match(res.user.id, /^u_/);
      assert.equal(res.user.username, username);
      assert.equal(res.user.displayName, "Compat Tester");
      assert.equal(res.user.role, Role.MEMBER);
      assertTimestamp(res.user.createdAt, "user.createdAt");
      assert.ok(res.tokens?.accessToken, "access token is set");
      assert.match(res.tokens.refreshToken, /^rt_/);
      assertTimestamp(res.tokens.accessExpiresAt, "tokens.accessExpiresAt");
      assertTimestamp(res.tokens.refreshExpiresAt, "tokens.refreshExpiresAt", { maxFutureDays: 366 });
      assert.ok(
        timestampDate(res.tokens.accessExpiresAt) > new Date(),
        "the access token expires in the future",
      );
    });

    test("SignUp with a taken username is AlreadyExists", async () => {
      await expectConnectError(() => auth.signUp({ username, password: PASSWORD }), Code.AlreadyExists);
    });

    test("SignIn with a wrong password is Unauthenticated", async () => {
      const err = await expectConnectError(
        () => auth.signIn({ username, password: "not the password" }),
        Code.Unauthenticated,
      );
      // The error body is JSON whatever the request codec; connect-es must decode it.
      assert.equal(seen.requestType, wantContentType);
      assert.match(err.message, /^\[unauthenticated\] /);
    });

    test("SignIn returns a session for the account", async () => {
      const res = await auth.signIn({ username, password: PASSWORD });
      accessToken = res.tokens?.accessToken ?? "";
      assertCodec();
      assert.ok(userId, "needs the SignUp step");
      assert.equal(res.user?.id, userId);
      assert.ok(accessToken, "access token is set");
      assertTimestamp(res.tokens.accessExpiresAt, "tokens.accessExpiresAt");
    });

    test("GetMe with the bearer token returns the caller", async () => {
      assert.ok(accessToken, "needs the SignIn step");
      const res = await users.getMe({});
      assertCodec();
      assert.equal(res.user?.id, userId);
      assert.equal(res.user.username, username);
      assert.equal(res.user.external, false);
      assertTimestamp(res.user.createdAt, "user.createdAt");
      // A call deadline goes out as Connect-Timeout-Ms; the server accepts it.
      const timed = await users.getMe({}, { timeoutMs: 10_000 });
      assert.equal(timed.user?.id, userId);
    });

    test("GetMe without a token is Unauthenticated", async () => {
      const saved = accessToken;
      accessToken = "";
      try {
        await expectConnectError(() => users.getMe({}), Code.Unauthenticated);
      } finally {
        accessToken = saved;
      }
    });

    test("UpdateProfile changes only the fields that are set", async () => {
      assert.ok(accessToken, "needs the SignIn step");
      const res = await users.updateProfile({ bio: `written over ${codec}` });
      assertCodec();
      assert.equal(res.user?.bio, `written over ${codec}`);
      assert.equal(res.user.displayName, "Compat Tester", "an unset optional field is unchanged");
      const renamed = await users.updateProfile({ displayName: `Compat ${codec}`, avatarUrl: "" });
      assert.equal(renamed.user?.displayName, `Compat ${codec}`);
      assert.equal(renamed.user.bio, `written over ${codec}`);
      assert.equal(renamed.user.avatarUrl, "");
    });

    test("SearchUsers finds the account by prefix", async () => {
      assert.ok(accessToken, "needs the SignIn step");
      const res = await users.searchUsers({ prefix: username, pageSize: 10 });
      assertCodec();
      assert.deepEqual(
        res.users.map((u) => u.id),
        [userId],
      );
      assert.equal(res.nextPageToken, "");
    });

    test("CreateRoom makes a public room owned by the caller", async () => {
      assert.ok(accessToken, "needs the SignIn step");
      const res = await rooms.createRoom({ kind: RoomKind.PUBLIC, title: `connect-es ${codec}`, topic: "compat" });
      roomId = res.room?.id ?? "";
      assertCodec();
      assert.ok(res.room, "room is set");
      assert.match(res.room.id, /^r_/);
      assert.equal(res.room.kind, RoomKind.PUBLIC);
      assert.equal(res.room.title, `connect-es ${codec}`);
      assert.equal(res.room.createdBy, userId);
      assert.equal(typeof res.room.lastSeq, "bigint");
      assert.equal(res.room.lastSeq, 0n);
      assertTimestamp(res.room.createdAt, "room.createdAt");
    });

    const clientMessageId = `cm-${codec}-${randomBytes(4).toString("hex")}`;
    const metadata = { lang: "en", "x-codec": codec, empty: "" };

    test("SendMessage stores a message with a sequence and metadata", async () => {
      assert.ok(roomId, "needs the CreateRoom step");
      const res = await rooms.sendMessage({
        roomId,
        text: `hello from connect-es (${codec}) ✓`,
        metadata,
        clientMessageId,
      });
      firstSeq = res.message?.seq ?? 0n;
      assertCodec();
      assert.equal(res.duplicate, false);
      const m = res.message;
      assert.ok(m, "message is set");
      assert.equal(typeof m.seq, "bigint", "seq is a uint64 (bigint)");
      assert.ok(m.seq >= 1n, `seq >= 1 (got ${m.seq})`);
      assert.equal(m.roomId, roomId);
      assert.equal(m.senderId, userId);
      assert.equal(m.kind, MessageKind.TEXT);
      assert.equal(m.text, `hello from connect-es (${codec}) ✓`);
      assert.deepEqual({ ...m.metadata }, metadata);
      assert.equal(m.clientMessageId, clientMessageId);
      assert.equal(m.replyToSeq, 0n);
      assertTimestamp(m.createdAt, "message.createdAt");
      assert.equal(m.editedAt, undefined, "editedAt is unset for a new message");
    });

    test("a retried SendMessage is a duplicate with the same seq", async () => {
      assert.ok(firstSeq > 0n, "needs the SendMessage step");
      const res = await rooms.sendMessage({ roomId, text: "the retry's text is ignored", clientMessageId });
      assertCodec();
      assert.equal(res.duplicate, true);
      assert.equal(res.message?.seq, firstSeq);
      assert.equal(res.message.text, `hello from connect-es (${codec}) ✓`);
    });

    test("SendMessage replying to a seq gets the next seq", async () => {
      assert.ok(firstSeq > 0n, "needs the SendMessage step");
      const res = await rooms.sendMessage({ roomId, text: "a reply", replyToSeq: firstSeq });
      assertCodec();
      assert.equal(res.duplicate, false);
      assert.equal(res.message?.seq, firstSeq + 1n);
      assert.equal(res.message.replyToSeq, firstSeq);
    });

    test("ListMessages returns the history in order", async () => {
      assert.ok(firstSeq > 0n, "needs the SendMessage step");
      const res = await rooms.listMessages({ roomId, afterSeq: 0n, limit: 10 });
      assertCodec();
      assert.equal(res.hasMore, false);
      assert.equal(typeof res.lastSeq, "bigint");
      assert.equal(res.lastSeq, firstSeq + 1n);
      assert.deepEqual(
        res.messages.map((m) => m.seq),
        [firstSeq, firstSeq + 1n],
      );
      const [first, reply] = res.messages;
      assert.equal(first.text, `hello from connect-es (${codec}) ✓`);
      assert.deepEqual({ ...first.metadata }, metadata);
      assert.equal(first.clientMessageId, clientMessageId);
      assertTimestamp(first.createdAt, "messages[0].createdAt");
      assert.equal(reply.replyToSeq, firstSeq);
      // A 64-bit value above 2^53 goes over the wire intact (a JSON string / varint).
      const newest = await rooms.listMessages({ roomId, beforeSeq: 2n ** 63n + 7n, limit: 1 });
      assert.deepEqual(
        newest.messages.map((m) => m.seq),
        [firstSeq + 1n],
      );
      assert.equal(newest.hasMore, true);
    });

    test("an unknown room is NotFound", async () => {
      assert.ok(accessToken, "needs the SignIn step");
      await expectConnectError(() => rooms.getRoom({ roomId: "r_NoSuchRoom0000000" }), Code.NotFound);
      await expectConnectError(
        () => rooms.sendMessage({ roomId: "r_NoSuchRoom0000000", text: "hello?" }),
        Code.NotFound,
      );
    });
  });
}
