// The bundled web client in a real headless Chromium (puppeteer-core), against a
// running roomcast (ROOMCAST_URL, started by scripts/web-test.sh with 20 s access
// tokens). Two users in two browser contexts: alice on a desktop-sized window, bob
// on a phone-sized one. Every wait is bounded (WAIT, or the token lifetime).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import puppeteer from "puppeteer-core";

const BASE = process.env.ROOMCAST_URL;
const CHROMIUM = process.env.ROOMCAST_CHROMIUM;
/** The longest any single step may take. */
const WAIT = 15000;
/** Longer than the server's access token lifetime (20 s in scripts/web-test.sh). */
const TOKEN_WAIT = 40000;
const PASSWORD = "correct horse battery staple";

assert.ok(BASE, "ROOMCAST_URL must be set (run scripts/web-test.sh)");
assert.ok(CHROMIUM, "ROOMCAST_CHROMIUM must be set (run scripts/web-test.sh)");

const suffix = randomBytes(4).toString("hex");
let browser;

before(async () => {
  browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    // Root in a container has no user namespace for Chromium's sandbox.
    args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
    protocolTimeout: 60000,
  });
});

after(async () => {
  await browser?.close();
});

/** A fresh browser context (its own storage) with one page on the client. */
async function openClient(name, viewport) {
  const context = await browser.createBrowserContext();
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  await page.setViewport(viewport);
  const problems = [];
  page.on("pageerror", (e) => problems.push(`${name}: page error: ${e.message}`));
  page.on("console", (msg) => {
    // Failed requests (a 401 for a wrong password, offline sockets) are logged as
    // errors too and are expected; a CSP violation or a script error is not.
    if (/Content Security Policy|Uncaught|SyntaxError|TypeError|ReferenceError/.test(msg.text())) {
      problems.push(`${name}: console: ${msg.text()}`);
    }
  });
  const sockets = [];
  const cdp = await page.createCDPSession();
  await cdp.send("Network.enable");
  cdp.on("Network.webSocketCreated", (e) => sockets.push(e.url));
  await page.goto(BASE, { waitUntil: "load" });
  return { name, context, page, problems, sockets };
}

const visible = (page, selector) => page.waitForSelector(selector, { visible: true });

async function status(page, state, timeout = WAIT) {
  await page.waitForSelector(`#status[data-state="${state}"]`, { timeout });
}

async function texts(page, selector) {
  return page.$$eval(selector, (els) => els.map((e) => e.textContent));
}

/** Waits until the room shows exactly `expected` (in order), then asserts it. */
async function expectMessages(page, expected, timeout = WAIT) {
  try {
    await page.waitForFunction(
      (want) => JSON.stringify([...document.querySelectorAll("#messages li.msg .text")].map((e) => e.textContent)) === want,
      { timeout },
      JSON.stringify(expected),
    );
  } catch {
    // Fall through: the assertion below shows what the page has instead.
  }
  assert.deepEqual(await texts(page, "#messages li.msg .text"), expected);
}

async function fill(page, selector, value) {
  await page.$eval(selector, (el) => { el.value = ""; });
  await page.type(selector, value);
}

async function authenticate(page, action, username, password) {
  await visible(page, "#auth-form");
  await fill(page, '#auth-form input[name="username"]', username);
  await fill(page, '#auth-form input[name="password"]', password);
  await page.click(`#auth-form button[value="${action}"]`);
}

async function send(page, text) {
  await page.type("#composer textarea", text);
  await page.keyboard.press("Enter");
}

async function sessionToken(page) {
  return page.evaluate(() => JSON.parse(sessionStorage.getItem("roomcast.session") ?? "null")?.accessToken ?? null);
}

test("two users chat through the web client", async (t) => {
  const alice = await openClient("alice", { width: 1280, height: 800 });
  const bob = await openClient("bob", { width: 390, height: 844, isMobile: true, hasTouch: true });
  const aliceName = `alice-${suffix}`;
  const bobName = `bob-${suffix}`;
  const title = `Lobby ${suffix}`;
  const said = [];

  await t.test("a wrong password shows the server's error", async () => {
    await authenticate(alice.page, "signin", `nobody-${suffix}`, "not the password at all");
    await alice.page.waitForFunction(() => document.querySelector("#auth-error").textContent !== "");
    assert.equal(await alice.page.$eval("#auth-error", (e) => e.textContent), "wrong username or password");
    assert.equal(await alice.page.$eval("#chat-view", (e) => e.hidden), true);
  });

  await t.test("alice signs up and creates a public room", async () => {
    await authenticate(alice.page, "signup", aliceName, PASSWORD);
    await visible(alice.page, "#chat-view");
    await status(alice.page, "live");
    assert.equal(await alice.page.$eval("#me", (e) => e.textContent), aliceName);
    await fill(alice.page, '#create-room input[name="title"]', title);
    await fill(alice.page, '#create-room input[name="topic"]', "<b>not bold</b>");
    await alice.page.click('#create-room button[type="submit"]');
    await alice.page.waitForFunction((t) => document.querySelector("#room-title").textContent === t, {}, title);
    // User text is text, never markup.
    assert.equal(await alice.page.$eval("#room-topic", (e) => e.textContent), "<b>not bold</b>");
    assert.equal(await alice.page.$("#room-topic b"), null);
    await visible(alice.page, "#composer");
  });

  await t.test("bob signs up on a phone, finds the room and joins it", async () => {
    await authenticate(bob.page, "signup", bobName, PASSWORD);
    await visible(bob.page, "#chat-view");
    await status(bob.page, "live");
    const join = await bob.page.waitForFunction((t) => {
      const li = [...document.querySelectorAll("#public-rooms li")].find((l) => l.querySelector(".link")?.textContent === t);
      return li?.querySelector("button.join");
    }, {}, title);
    await join.click();
    await bob.page.waitForFunction((t) => document.querySelector("#room-title").textContent === t, {}, title);
    await visible(bob.page, "#composer");
    // On a phone the room replaces the room list, and the composer fits the screen.
    assert.equal(await bob.page.$eval(".sidebar", (e) => getComputedStyle(e).display), "none");
    const box = await (await bob.page.$("#composer button")).boundingBox();
    assert.ok(box && box.x >= 0 && box.x + box.width <= 390, `composer button at ${JSON.stringify(box)}`);
    // Bob is now a member: the room is under "My rooms" (back on the list).
    await bob.page.click("#back");
    await bob.page.waitForFunction((t) => [...document.querySelectorAll("#my-rooms .link")].some((l) => l.textContent === t), {}, title);
    await bob.page.evaluate((t) => [...document.querySelectorAll("#my-rooms .link")].find((l) => l.textContent === t).click(), title);
    await visible(bob.page, "#composer");
  });

  await t.test("messages arrive live, in order, on both sides, with presence", async () => {
    // Alice sees bob online (he joined and holds a WebSocket).
    await alice.page.waitForFunction((n) => [...document.querySelectorAll("#members li.online")].some((l) => l.textContent === n), {}, bobName);
    await send(alice.page, "hello bob");
    said.push("hello bob");
    await expectMessages(bob.page, said);
    await send(bob.page, "hi alice <script>alert(1)</script>");
    said.push("hi alice <script>alert(1)</script>");
    await expectMessages(alice.page, said);
    await expectMessages(bob.page, said);
    assert.equal(await alice.page.$("#messages script"), null);
    const authors = await texts(alice.page, "#messages li.msg .author");
    assert.deepEqual(authors, [aliceName, bobName]);
  });

  await t.test("typing shows on the other side", async () => {
    // Bob keeps typing, as a person does: the server relays at most one "typing" a
    // second per room, and the page repeats it every few seconds while keys come.
    const shown = (n) => document.querySelector("#typing").textContent === `${n} is typing…`;
    const deadline = Date.now() + WAIT;
    while (!(await alice.page.evaluate(shown, bobName)) && Date.now() < deadline) {
      await bob.page.type("#composer textarea", "x");
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
    assert.equal(await alice.page.$eval("#typing", (e) => e.textContent), `${bobName} is typing…`);
    await bob.page.$eval("#composer textarea", (e) => { e.value = ""; });
  });

  await t.test("bob goes offline, alice sends 3, bob comes back and sees each once, in order", async () => {
    const socketsBefore = bob.sockets.length;
    await bob.page.setOfflineMode(true);
    await status(bob.page, "offline");
    for (const text of ["one", "two", "three"]) {
      await send(alice.page, text);
      said.push(text);
      await expectMessages(alice.page, said);
    }
    // What bob writes meanwhile waits, shown as pending.
    await send(bob.page, "written offline");
    await visible(bob.page, "#outbox li.pending");
    assert.deepEqual(await texts(bob.page, "#outbox li.pending .text"), ["written offline"]);
    assert.deepEqual(await texts(bob.page, "#messages li.msg .text"), said.slice(0, -3));

    await bob.page.setOfflineMode(false);
    await status(bob.page, "live");
    said.push("written offline");
    await expectMessages(bob.page, said);
    await expectMessages(alice.page, said);
    assert.deepEqual(await texts(bob.page, "#outbox li"), []);
    assert.ok(bob.sockets.length > socketsBefore, "bob reconnected with a new WebSocket");
  });

  await t.test("a reload keeps the session, the room and its history", async () => {
    await bob.page.reload({ waitUntil: "load" });
    await status(bob.page, "live");
    await bob.page.waitForFunction((t) => document.querySelector("#room-title").textContent === t, {}, title);
    await expectMessages(bob.page, said);
    // And the reloaded page is live: a new message arrives.
    await send(alice.page, "after the reload");
    said.push("after the reload");
    await expectMessages(bob.page, said);
  });

  await t.test("older history loads on demand, above what is shown", async () => {
    // 55 more messages through the API (the page shows 50 events at first).
    const batch = Array.from({ length: 55 }, (_, i) => `bulk ${i + 1}`);
    await alice.page.evaluate(async (texts) => {
      const token = JSON.parse(sessionStorage.getItem("roomcast.session")).accessToken;
      const roomId = new URLSearchParams(location.hash.slice(1)).get("room");
      for (const text of texts) {
        const res = await fetch("/roomcast.v1.RoomService/SendMessage", {
          method: "POST",
          headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
          body: JSON.stringify({ roomId, text }),
        });
        if (!res.ok) throw new Error(await res.text());
      }
    }, batch);
    said.push(...batch);
    await expectMessages(alice.page, said);
    await bob.page.reload({ waitUntil: "load" });
    await status(bob.page, "live");
    await expectMessages(bob.page, said.slice(-50));
    await visible(bob.page, "#load-older");
    await bob.page.click("#load-older");
    await expectMessages(bob.page, said);
    await bob.page.waitForSelector("#load-older", { hidden: true });
  });

  await t.test("the access token is refreshed and the socket stays up", async () => {
    const before = await sessionToken(alice.page);
    assert.ok(before, "alice has a session");
    await alice.page.waitForFunction(
      (old) => JSON.parse(sessionStorage.getItem("roomcast.session") ?? "null")?.accessToken !== old,
      { timeout: TOKEN_WAIT },
      before,
    );
    // Past the old token's expiry, the same socket still delivers both ways.
    await new Promise((resolve) => setTimeout(resolve, 6000));
    await send(alice.page, "after a refresh");
    said.push("after a refresh");
    await expectMessages(bob.page, said);
    await status(alice.page, "live");
    assert.equal(alice.sockets.length, 1, `alice's sockets: ${alice.sockets.join(", ")}`);
  });

  await t.test("signing out returns to the sign-in form, and others see bob go offline", async () => {
    await bob.page.click("#sign-out");
    await visible(bob.page, "#auth-form");
    assert.equal(await bob.page.$eval("#chat-view", (e) => e.hidden), true);
    assert.equal(await sessionToken(bob.page), null);
    await alice.page.waitForFunction((n) => [...document.querySelectorAll("#members li.offline")].some((l) => l.textContent === n), {}, bobName);
    await bob.page.reload({ waitUntil: "load" });
    await visible(bob.page, "#auth-form");
  });

  await t.test("no script errors and no CSP violations", async () => {
    if (process.env.ROOMCAST_WEB_TEST_DIR) {
      await alice.page.screenshot({ path: `${process.env.ROOMCAST_WEB_TEST_DIR}/alice.png` });
    }
    assert.deepEqual([...alice.problems, ...bob.problems], []);
  });

  await alice.context.close();
  await bob.context.close();
});
