// Compression with a real connect-es client: `sendCompression: compressionGzip`
// makes connect-es gzip every request body of `compressMinBytes` (1 KiB) or more,
// and it accepts gzip replies by default. A small recording proxy between the
// client and the server shows what went over the wire (Content-Encoding both
// ways), so the checks below prove that compression really happened.
//
// Run by scripts/connect-es-test.sh (see compat.test.mjs for running it by hand).
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import http from "node:http";
import { after, before, describe, test } from "node:test";

import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { compressionBrotli, compressionGzip, createConnectTransport } from "@connectrpc/connect-node";

import { AuthService } from "./gen/roomcast/v1/auth_pb.js";
import { RoomKind, RoomService } from "./gen/roomcast/v1/rooms_pb.js";

const baseUrl = process.env.ROOMCAST_URL;
if (!baseUrl) {
  throw new Error("set ROOMCAST_URL to a running roomcast server, e.g. http://127.0.0.1:8080");
}

const PASSWORD = "correct horse battery staple";

/**
 * A loopback HTTP proxy to `target` that records, per request, the path and the
 * Content-Encoding of the request and of the reply; bodies pass through untouched.
 */
function startRecordingProxy(target) {
  const seen = [];
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on("data", (chunk) => chunks.push(chunk));
    req.on("end", () => {
      const body = Buffer.concat(chunks);
      const url = new URL(req.url, target);
      const upstream = http.request(
        url,
        { method: req.method, headers: { ...req.headers, host: url.host } },
        (reply) => {
          seen.push({
            path: req.url,
            requestEncoding: req.headers["content-encoding"] ?? "",
            requestBytes: body.length,
            responseEncoding: reply.headers["content-encoding"] ?? "",
            status: reply.statusCode,
          });
          res.writeHead(reply.statusCode ?? 502, reply.headers);
          reply.pipe(res);
        },
      );
      upstream.on("error", (e) => {
        res.writeHead(502, { "content-type": "text/plain" });
        res.end(`proxy: ${e}`);
      });
      upstream.end(body);
    });
  });
  return new Promise((resolve) => {
    server.listen(0, "127.0.0.1", () => {
      resolve({
        url: `http://127.0.0.1:${server.address().port}`,
        seen,
        /** The last recorded exchange for an RPC method, e.g. "SendMessage". */
        last(method) {
          const matching = seen.filter((s) => s.path.endsWith(`/${method}`));
          assert.ok(matching.length > 0, `the proxy saw a ${method} call`);
          return matching[matching.length - 1];
        },
        close() {
          server.closeAllConnections();
          return new Promise((r) => server.close(r));
        },
      });
    });
  });
}

let proxy;
before(async () => {
  proxy = await startRecordingProxy(baseUrl);
});
after(async () => {
  await proxy?.close();
});

for (const useBinaryFormat of [false, true]) {
  const codec = useBinaryFormat ? "binary" : "json";

  describe(`connect-es with gzip over ${codec}`, () => {
    let accessToken = "";
    const transport = (sendCompression) =>
      createConnectTransport({
        baseUrl: proxy.url,
        httpVersion: "1.1",
        useBinaryFormat,
        sendCompression,
        // connect-es's default threshold: bodies of 1 KiB and more are compressed.
        compressMinBytes: 1024,
        acceptCompression: [compressionGzip],
        interceptors: [
          (next) => async (req) => {
            if (accessToken) {
              req.header.set("Authorization", `Bearer ${accessToken}`);
            }
            return next(req);
          },
        ],
      });
    let auth;
    let rooms;
    let roomId = "";
    const bigText = `${codec}: ` + "a compressible sentence, again and again. ".repeat(60);

    before(() => {
      auth = createClient(AuthService, transport(compressionGzip));
      rooms = createClient(RoomService, transport(compressionGzip));
    });

    test("a small request goes uncompressed and works", async () => {
      const username = `gz_${codec}_${randomBytes(4).toString("hex")}`;
      const res = await auth.signUp({ username, password: PASSWORD });
      accessToken = res.tokens?.accessToken ?? "";
      assert.ok(accessToken);
      assert.equal(proxy.last("SignUp").requestEncoding, "", "below 1 KiB: not compressed");
      const room = await rooms.createRoom({ kind: RoomKind.PUBLIC, title: `gzip ${codec}` });
      roomId = room.room?.id ?? "";
      assert.match(roomId, /^r_/);
    });

    test("a request body of 1 KiB or more is sent gzipped and stored intact", async () => {
      assert.ok(roomId, "needs the previous step");
      const res = await rooms.sendMessage({ roomId, text: bigText, clientMessageId: `gz-${codec}` });
      const wire = proxy.last("SendMessage");
      assert.equal(wire.status, 200);
      assert.equal(wire.requestEncoding, "gzip", "connect-es compressed the request");
      assert.ok(wire.requestBytes < bigText.length / 4, `the body was small on the wire (${wire.requestBytes} bytes)`);
      assert.equal(res.message?.text, bigText);
    });

    test("a large reply comes back gzipped and decodes", async () => {
      assert.ok(roomId, "needs the previous step");
      for (let i = 0; i < 3; i++) {
        await rooms.sendMessage({ roomId, text: `${bigText} #${i}` });
      }
      const res = await rooms.listMessages({ roomId, afterSeq: 0n, limit: 10 });
      const wire = proxy.last("ListMessages");
      assert.equal(wire.status, 200);
      assert.equal(wire.responseEncoding, "gzip", "the server compressed the reply");
      assert.equal(res.messages.length, 4);
      assert.equal(res.messages[0].text, bigText);
      assert.equal(res.messages[3].text, `${bigText} #2`);
    });

    test("an encoding the server does not support is Unimplemented, naming gzip", async () => {
      assert.ok(roomId, "needs the previous step");
      const brotliRooms = createClient(RoomService, transport(compressionBrotli));
      let caught;
      try {
        await brotliRooms.sendMessage({ roomId, text: bigText });
      } catch (e) {
        caught = e;
      }
      assert.ok(caught instanceof ConnectError, `expected a ConnectError, got ${caught}`);
      assert.equal(caught.code, Code.Unimplemented, caught.rawMessage);
      assert.match(caught.rawMessage, /gzip/);
      assert.equal(proxy.last("SendMessage").requestEncoding, "br");
    });
  });
}
