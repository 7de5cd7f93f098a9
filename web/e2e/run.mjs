// End-to-end tests of the web client: the real chatlog-server binary, real headless Chromium
// (Debian's /usr/bin/chromium driven by playwright-core), two users in two browser contexts.
// Run by crates/chatlog-server/tests/web_e2e.rs, which passes:
//   CHATLOG_BIN        the server binary
//   CHATLOG_E2E_PORT   a free port on 127.0.0.1 (the server is restarted on it)
//   CHATLOG_E2E_DIR    an empty temporary directory (data directories go under it)
//   CHATLOG_E2E_ARTIFACTS  where screenshots go
// Optional: CHATLOG_E2E_DEBUG=1 prints every frame of alice's socket, CHATLOG_E2E_SERVER_LOG=1
// the server's log.
// The steps form one conversation, in order; the first failure ends the run (later steps
// depend on it) with screenshots of every page, and the exit status is 1.

import { spawn, execFileSync } from 'node:child_process';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import zlib from 'node:zlib';
import { chromium } from 'playwright-core';

const BIN = need('CHATLOG_BIN');
const PORT = Number(need('CHATLOG_E2E_PORT'));
const DIR = need('CHATLOG_E2E_DIR');
const ARTIFACTS = need('CHATLOG_E2E_ARTIFACTS');
const SECRET = `e2e-secret-${process.pid}-${Date.now()}`;
const BASE = `http://127.0.0.1:${PORT}`;
/** How long a step waits for something that must happen. */
const WAIT_MS = 15000;
/** The whole run is stopped after this long. */
const RUN_MS_MAX = 150000;

const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

function need(name) {
  const v = process.env[name];
  if (!v) {
    console.error(`run.mjs: ${name} is not set (run through cargo test -p chatlog-server --test web_e2e)`);
    process.exit(2);
  }
  return v;
}

// ------------------------------------------------------------------ servers

const children = new Set();

class Server {
  constructor(args, opts = {}) {
    this.args = args;
    this.opts = opts;
    this.proc = null;
    this.stdout = '';
  }

  async start() {
    const proc = spawn(BIN, this.args, {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...(this.opts.cleanEnv ? {} : process.env), RUST_LOG: 'warn', ...this.opts.env },
      cwd: this.opts.cwd,
    });
    this.proc = proc;
    children.add(proc);
    this.exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
    this.exited.then(() => children.delete(proc));
    proc.stdout.on('data', (d) => {
      this.stdout += d;
    });
    proc.stderr.on('data', (d) => {
      if (process.env.CHATLOG_E2E_SERVER_LOG) process.stderr.write(d);
    });
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      const base = this.base();
      if (base && (await status(`${base}/healthz`)) === 200) return this;
      if (proc.exitCode !== null) throw new Error(`server exited early: ${proc.exitCode}`);
      if (Date.now() > deadline) throw new Error('server did not start');
      await sleep(50);
    }
  }

  base() {
    if (this.opts.base) return this.opts.base;
    const m = this.stdout.match(/web client: (http:\/\/[^\s]+?)\/?\s/);
    return m ? m[1] : null;
  }

  async stop(signal = 'SIGTERM') {
    if (!this.proc || this.proc.exitCode !== null) return;
    this.proc.kill(signal);
    const r = await this.exited;
    if (signal === 'SIGTERM') assert.equal(r.code, 0, 'SIGTERM ends the server cleanly');
  }
}

function mainServer() {
  return new Server(
    ['serve', '--listen', `127.0.0.1:${PORT}`, '--data-dir', path.join(DIR, 'data'), '--auth-secret', SECRET, '--rate-limit', '0'],
    { base: BASE },
  );
}

function token(user) {
  return execFileSync(BIN, ['token', '--user', user, '--auth-secret', SECRET], { encoding: 'utf8' }).trim();
}

async function status(url) {
  try {
    return (await fetch(url)).status;
  } catch {
    return 0;
  }
}

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

/** A raw request with any Host header (fetch may not set it). */
function rawPost(url, host, body) {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    const req = http.request(
      { host: u.hostname, port: u.port, path: u.pathname, method: 'POST', headers: { Host: host, 'Content-Type': 'application/json' } },
      (res) => {
        let data = '';
        res.on('data', (d) => {
          data += d;
        });
        res.on('end', () => resolve({ status: res.statusCode, body: data }));
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

// ------------------------------------------------------------------ page helpers

const pages = new Map(); // name → page

async function shot(name) {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  for (const [who, page] of pages) {
    if (!page.isClosed()) await page.screenshot({ path: path.join(ARTIFACTS, `${name}-${who}.png`) }).catch(() => {});
  }
}

async function online(page) {
  await page.waitForSelector('body[data-conn="online"]', { timeout: WAIT_MS });
}

async function signIn(page, tok) {
  await page.goto(`${BASE}/`);
  await page.fill('#token', tok);
  await page.click('#token-form button[type="submit"]');
  await online(page);
}

async function openChat(page, name) {
  const item = page.locator('.chat-item', { has: page.locator('.name', { hasText: name }) });
  await item.first().click();
  await page.waitForFunction((n) => document.getElementById('chat-title').textContent === n, name, { timeout: WAIT_MS });
}

async function send(page, text) {
  await page.fill('#text', text);
  await page.press('#text', 'Enter');
}

/** The confirmed messages on screen: [seq, body-or-tombstone] in screen order. */
function confirmed(page) {
  return page.$$eval('#messages li.msg[data-seq]', (lis) =>
    lis.map((li) => [Number(li.dataset.seq), li.querySelector('.body')?.textContent ?? null]),
  );
}

function pendingCount(page) {
  return page.$$eval('#messages li.pending', (lis) => lis.length);
}

/** Waits until the confirmed message with this body shows on the page; returns its seq. */
async function waitMessage(page, body) {
  const h = await page.waitForFunction(
    (b) => {
      for (const li of document.querySelectorAll('#messages li.msg[data-seq]')) {
        if (li.querySelector('.body')?.textContent === b) return Number(li.dataset.seq);
      }
      return null;
    },
    body,
    { timeout: WAIT_MS },
  );
  return h.jsonValue();
}

async function waitTick(page, seq, state) {
  await page.waitForSelector(`#messages li[data-seq="${seq}"] .tick[data-state="${state}"]`, { timeout: WAIT_MS });
}

function msgLocator(page, seq) {
  return page.locator(`#messages li[data-seq="${seq}"]`);
}

// A 24×24 PNG: red square (made here, no binary file in the repository).
function png() {
  const w = 24;
  const h = 24;
  const raw = Buffer.alloc((w * 3 + 1) * h);
  for (let y = 0; y < h; y++) {
    raw[y * (w * 3 + 1)] = 0;
    for (let x = 0; x < w; x++) raw.set([220, 30, 30], y * (w * 3 + 1) + 1 + x * 3);
  }
  const chunk = (type, data) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const td = Buffer.concat([Buffer.from(type), data]);
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(crc32(td) >>> 0);
    return Buffer.concat([len, td, crc]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0);
  ihdr.writeUInt32BE(h, 4);
  ihdr.set([8, 2, 0, 0, 0], 8);
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', ihdr),
    chunk('IDAT', zlib.deflateSync(raw)),
    chunk('IEND', Buffer.alloc(0)),
  ]);
}
function crc32(buf) {
  let c = ~0;
  for (const b of buf) {
    c ^= b;
    for (let k = 0; k < 8; k++) c = (c >>> 1) ^ (0xedb88320 & -(c & 1));
  }
  return ~c;
}

// ------------------------------------------------------------------ the run

const steps = [];
function step(name, fn) {
  steps.push({ name, fn });
}

const ctx = {};

step('the server serves the page, its files and security headers', async () => {
  ctx.server = await mainServer().start();
  const r = await fetch(`${BASE}/`);
  assert.equal(r.status, 200);
  assert.match(r.headers.get('content-type'), /^text\/html/);
  assert.match(r.headers.get('content-security-policy'), /script-src 'self'/);
  assert.match(await r.text(), /<script type="module" src="\/web\/app.js">/);
  const js = await fetch(`${BASE}/web/client.js`);
  assert.equal(js.status, 200);
  assert.match(js.headers.get('content-type'), /^text\/javascript/);
  assert.equal(await status(`${BASE}/web/nope.js`), 404);
  // Not the dev run: no token endpoint.
  const dev = await fetch(`${BASE}/v1/dev/token`, { method: 'POST', body: '{"user":"x"}' });
  assert.equal(dev.status, 404);
});

step('dev run (no arguments): the page signs in with a demo token; only on loopback names', async () => {
  const cwd = path.join(DIR, 'dev');
  fs.mkdirSync(cwd, { recursive: true });
  // No arguments at all, as `cargo run -p chatlog-server`; the port comes from the
  // environment so that the run does not need 8080.
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('CHATLOG_')));
  const dev = await new Server([], { cwd, env: { ...env, CHATLOG_LISTEN: '127.0.0.1:0' }, cleanEnv: true }).start();
  try {
    const base = dev.base();
    assert.match(dev.stdout, /demo token/);
    const page = await ctx.browser.newPage();
    pages.set('dev', page);
    await page.goto(`${base}/`);
    await page.waitForSelector('#dev-form:not([hidden])', { timeout: WAIT_MS });
    await page.fill('#dev-user', 'carol');
    await page.click('#dev-form button[type="submit"]');
    await page.waitForSelector('body[data-conn="online"]', { timeout: WAIT_MS });
    assert.equal(await page.textContent('#me'), 'Signed in as carol');
    await shot('01-dev-signin');
    const evil = await rawPost(`${base}/v1/dev/token`, 'attacker.example', '{"user":"carol"}');
    assert.equal(evil.status, 403, 'a non-loopback Host gets no token');
    const ok = await rawPost(`${base}/v1/dev/token`, new URL(base).host, '{"user":"carol"}');
    assert.equal(ok.status, 200);
    assert.equal(JSON.parse(ok.body).user, 'carol');
    await page.close();
    pages.delete('dev');
  } finally {
    await dev.stop();
  }
});

step('two users sign in with tokens (alice on a desktop, bob on a phone-sized screen)', async () => {
  ctx.aliceCtx = await ctx.browser.newContext({ viewport: { width: 1100, height: 760 } });
  ctx.bobCtx = await ctx.browser.newContext({ viewport: { width: 390, height: 844 }, hasTouch: true });
  await installDropper(ctx.aliceCtx);
  ctx.alice = await ctx.aliceCtx.newPage();
  ctx.bob = await ctx.bobCtx.newPage();
  pages.set('alice', ctx.alice);
  pages.set('bob', ctx.bob);
  await signIn(ctx.alice, token('alice'));
  await signIn(ctx.bob, token('bob'));
  // Every control has an accessible name.
  for (const page of [ctx.alice, ctx.bob]) {
    const unnamed = await page.evaluate(() =>
      [...document.querySelectorAll('button, input, textarea, summary')]
        .filter((e) => e.offsetParent !== null)
        .filter((e) => !(e.getAttribute('aria-label') || e.textContent.trim() || (e.labels && e.labels.length)))
        .map((e) => e.outerHTML.slice(0, 80)),
    );
    assert.deepEqual(unnamed, []);
  }
});

step('alice creates a group with bob; it shows up on both', async () => {
  const a = ctx.alice;
  await a.click('#new-chat summary');
  await a.fill('#group-title', 'lunch');
  await a.fill('#group-members', 'bob');
  await a.click('#group-form button[type="submit"]');
  await a.waitForFunction(() => document.getElementById('chat-title').textContent === 'lunch', null, { timeout: WAIT_MS });
  await ctx.bob.waitForSelector('.chat-item[aria-label^="lunch"]', { timeout: WAIT_MS });
});

step('alice sends; bob (chat closed) gets it as unread and alice sees delivered', async () => {
  await send(ctx.alice, 'hello bob');
  const seq = await waitMessage(ctx.alice, 'hello bob');
  ctx.helloSeq = seq;
  await waitTick(ctx.alice, seq, 'delivered');
  await ctx.bob.waitForSelector('.chat-item[aria-label="lunch, 1 unread"] .unread', { timeout: WAIT_MS });
  await shot('02-unread');
});

step('bob opens the chat: he sees the message, alice sees it read, the unread count is gone', async () => {
  await openChat(ctx.bob, 'lunch');
  await waitMessage(ctx.bob, 'hello bob');
  await waitTick(ctx.alice, ctx.helloSeq, 'read');
  assert.equal(await ctx.alice.getAttribute(`#messages li[data-seq="${ctx.helloSeq}"] .tick`, 'aria-label'), 'read');
  await ctx.bob.click('#back');
  await ctx.bob.waitForSelector('.chat-item[aria-label="lunch"]', { timeout: WAIT_MS });
  await openChat(ctx.bob, 'lunch');
  // Readable on a phone: nothing wider than the screen.
  const overflow = await ctx.bob.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `page is ${overflow}px wider than the phone screen`);
});

step('bob types: alice sees the typing indicator; his message arrives and clears it', async () => {
  await ctx.bob.click('#text');
  await ctx.bob.keyboard.type('hi al', { delay: 30 });
  await ctx.alice.waitForFunction(() => document.getElementById('typing').textContent === 'bob is typing…', null, { timeout: WAIT_MS });
  await shot('03-typing');
  await ctx.bob.keyboard.type('ice');
  await ctx.bob.keyboard.press('Enter');
  await waitMessage(ctx.alice, 'hi alice');
  await ctx.alice.waitForFunction(() => document.getElementById('typing').textContent === '', null, { timeout: WAIT_MS });
});

step('alice edits and deletes her messages; bob sees both', async () => {
  const a = ctx.alice;
  await msgLocator(a, ctx.helloSeq).locator('button.edit').click();
  assert.equal(await a.inputValue('#text'), 'hello bob');
  await a.fill('#text', 'hello bob, lunch at 1?');
  await a.press('#text', 'Enter');
  await waitMessage(ctx.bob, 'hello bob, lunch at 1?');
  await ctx.bob.waitForSelector(`#messages li[data-seq="${ctx.helloSeq}"] .edited`, { timeout: WAIT_MS });
  await send(a, 'oops, wrong chat');
  const oops = await waitMessage(ctx.bob, 'oops, wrong chat');
  await msgLocator(a, oops).locator('button.delete').click();
  await ctx.bob.waitForSelector(`#messages li[data-seq="${oops}"] .tombstone`, { timeout: WAIT_MS });
  // Keyboard: ArrowUp in the empty composer edits the latest own message; Escape cancels.
  await a.click('#text');
  await a.keyboard.press('ArrowUp');
  assert.equal(await a.inputValue('#text'), 'hello bob, lunch at 1?');
  await a.keyboard.press('Escape');
  assert.equal(await a.inputValue('#text'), '');
});

step('alice attaches an image: both see the preview', async () => {
  await ctx.alice.setInputFiles('#attach', { name: 'red.png', mimeType: 'image/png', buffer: png() });
  await ctx.alice.fill('#text', 'a picture');
  await ctx.alice.press('#text', 'Enter');
  const seq = await waitMessage(ctx.bob, 'a picture');
  for (const page of [ctx.alice, ctx.bob]) {
    await page.waitForFunction(
      (s) => {
        const img = document.querySelector(`#messages li[data-seq="${s}"] .attachment img`);
        return img && img.complete && img.naturalWidth === 24;
      },
      seq,
      { timeout: WAIT_MS },
    );
  }
  await shot('04-image');
});

step('presence: a direct chat shows bob online, with a dot in the list; keyboard moves between chats', async () => {
  const a = ctx.alice;
  await a.click('#new-chat summary');
  await a.fill('#direct-user', 'bob');
  await a.click('#direct-form button[type="submit"]');
  await a.waitForFunction(() => document.getElementById('chat-title').textContent === 'bob', null, { timeout: WAIT_MS });
  await a.waitForFunction(() => document.getElementById('chat-sub').textContent === 'online', null, { timeout: WAIT_MS });
  await a.waitForSelector('.chat-item[aria-label^="bob, online"] .dot.online', { timeout: WAIT_MS });
  // Alt+ArrowDown / Alt+ArrowUp switch chats; arrows move focus in the list.
  const before = await a.textContent('#chat-title');
  await a.keyboard.press('Alt+ArrowDown');
  await a.waitForFunction((t) => document.getElementById('chat-title').textContent !== t, before, { timeout: WAIT_MS });
  await a.focus('.chat-item >> nth=0');
  await a.keyboard.press('ArrowDown');
  assert.equal(await a.evaluate(() => [...document.querySelectorAll('.chat-item')].indexOf(document.activeElement)), 1);
  await openChat(a, 'lunch');
});

step('a reload resumes: same messages, same seqs, nothing twice', async () => {
  const before = await confirmed(ctx.bob);
  assert.ok(before.length >= 4, JSON.stringify(before));
  await ctx.bob.reload();
  await online(ctx.bob);
  await ctx.bob.waitForFunction((n) => document.querySelectorAll('#messages li.msg[data-seq]').length >= n, before.length, { timeout: WAIT_MS });
  assert.equal(await ctx.bob.textContent('#chat-title'), 'lunch', 'the open chat survives the reload');
  assert.deepEqual(await confirmed(ctx.bob), before);
});

step('a dropped send is retried with the same cmid after reconnecting, and shows once', async () => {
  ctx.drop.mode = 'request';
  await send(ctx.alice, 'lost on the way');
  await ctx.alice.waitForSelector('body[data-conn="online"]', { timeout: WAIT_MS });
  await waitMessage(ctx.alice, 'lost on the way');
  await waitMessage(ctx.bob, 'lost on the way');
  const cmids = ctx.drop.sent.filter((f) => f.body === 'lost on the way').map((f) => f.cmid);
  assert.ok(cmids.length >= 2, `sent ${cmids.length} times`);
  assert.equal(new Set(cmids).size, 1, 'every retry reuses the cmid');
  assert.ok(ctx.drop.closes >= 1);
});

step('a send whose reply and push are lost shows once after the reconnect', async () => {
  ctx.drop.mode = 'reply';
  await send(ctx.alice, 'reply lost');
  await waitMessage(ctx.bob, 'reply lost');
  await waitMessage(ctx.alice, 'reply lost');
  assert.ok(ctx.drop.closes >= 2);
  await sleep(300);
  for (const page of [ctx.alice, ctx.bob]) {
    const rows = await confirmed(page);
    assert.equal(rows.filter(([, b]) => b === 'reply lost').length, 1);
    assert.equal(rows.filter(([, b]) => b === 'lost on the way').length, 1);
    assert.equal(await pendingCount(page), 0);
  }
});

step('the server is killed mid-conversation and restarted: both pages recover, nothing lost or doubled', async () => {
  const a = ctx.alice;
  const b = ctx.bob;
  // A burst, and the server killed (SIGKILL) while it is on the wire.
  for (let i = 1; i <= 5; i++) await send(a, `burst ${i}`);
  await ctx.server.stop('SIGKILL');
  for (const page of [a, b]) {
    await page.waitForFunction(() => document.body.dataset.conn !== 'online', null, { timeout: WAIT_MS });
  }
  await send(a, 'sent while the server was down');
  await send(b, 'me too');
  await a.waitForSelector('#messages li.pending .tick[data-state="sending"]', { timeout: WAIT_MS });
  await shot('05-server-down');
  ctx.server = await mainServer().start();
  for (const page of [a, b]) await online(page);
  const expected = ['burst 1', 'burst 2', 'burst 3', 'burst 4', 'burst 5', 'sent while the server was down', 'me too'];
  for (const page of [a, b]) for (const body of expected) await waitMessage(page, body);
  for (const page of [a, b]) {
    await page.waitForFunction(() => document.querySelectorAll('#messages li.pending').length === 0, null, { timeout: WAIT_MS });
  }
  await sleep(500); // anything doubled would have arrived by now
  const ra = await confirmed(a);
  const rb = await confirmed(b);
  assert.deepEqual(ra, rb, 'both pages show the same messages at the same seqs');
  const seqs = ra.map(([s]) => s);
  assert.deepEqual(seqs, [...seqs].sort((x, y) => x - y), 'in seq order');
  assert.equal(new Set(seqs).size, seqs.length, 'no seq twice');
  for (const body of expected) assert.equal(ra.filter(([, t]) => t === body).length, 1, `${body} exactly once`);
  const bursts = ra.filter(([, t]) => t?.startsWith('burst ')).map(([, t]) => t);
  assert.deepEqual(bursts, expected.slice(0, 5), 'alice’s burst in the order she sent it');
  await shot('06-recovered');
});

step('history scroll-back: after a reload bob loads older pages by scrolling up, in order, once each', async () => {
  const a = ctx.alice;
  const b = ctx.bob;
  await a.click('#new-chat summary');
  await a.fill('#group-title', 'long');
  await a.fill('#group-members', 'bob');
  await a.click('#group-form button[type="submit"]');
  await a.waitForFunction(() => document.getElementById('chat-title').textContent === 'long', null, { timeout: WAIT_MS });
  const total = 75; // more than one history page (50)
  for (let i = 1; i <= total; i++) await send(a, `line ${i}`);
  await waitMessage(a, `line ${total}`);
  await b.click('#back');
  await openChat(b, 'long');
  await waitMessage(b, `line ${total}`);
  await b.reload();
  await online(b);
  await waitMessage(b, `line ${total}`);
  await b.waitForSelector('#load-older:not([hidden])', { timeout: WAIT_MS });
  const firstPage = (await confirmed(b)).length;
  assert.ok(firstPage < total, `the first page holds ${firstPage} of ${total}`);
  // Scrolling to the top loads the next page (keyboard users have the button).
  await b.evaluate(() => {
    document.getElementById('scroller').scrollTop = 0;
  });
  await b.waitForFunction(() => document.querySelector('#messages li.notice') !== null, null, { timeout: WAIT_MS });
  const rows = await confirmed(b);
  assert.deepEqual(rows.map(([, t]) => t), Array.from({ length: total }, (_, i) => `line ${i + 1}`));
  assert.deepEqual(rows.map(([s]) => s), Array.from({ length: total }, (_, i) => i + 2), 'seqs 2..=76 after the creation event');
  assert.ok(await b.isHidden('#load-older'), 'nothing older to load');
  await shot('07-scroll-back');
});

step('bob leaves: alice sees him offline with a last-seen time', async () => {
  await openChat(ctx.alice, 'bob');
  await ctx.alice.waitForFunction(() => document.getElementById('chat-sub').textContent === 'online', null, { timeout: WAIT_MS });
  await ctx.bobCtx.close();
  pages.delete('bob');
  await ctx.alice.waitForFunction(() => document.getElementById('chat-sub').textContent === 'last seen just now', null, { timeout: WAIT_MS });
  await ctx.alice.waitForSelector('.chat-item[aria-label^="bob, offline"] .dot.offline', { timeout: WAIT_MS });
  await shot('08-offline');
});

/**
 * Routes alice's WebSocket through a proxy that can lose things on purpose:
 * `request` drops her next send before it reaches the server and then cuts the socket;
 * `reply` lets the send through but drops its reply and its push, then cuts the socket.
 */
async function installDropper(context) {
  const drop = { mode: null, sent: [], closes: 0 };
  ctx.drop = drop;
  await context.routeWebSocket(/\/v1\/ws$/, (ws) => {
    const server = ws.connectToServer();
    let swallowId = null;
    let swallowCmid = null;
    ws.onMessage((m) => {
      let f = null;
      try {
        f = JSON.parse(m);
      } catch {
        // not JSON: pass through
      }
      if (f?.op === 'send') drop.sent.push({ cmid: f.cmid, body: f.body });
      if (process.env.CHATLOG_E2E_DEBUG) console.log('alice →', m);
      if (f?.op === 'send' && drop.mode === 'request') {
        drop.mode = null;
        drop.closes += 1;
        setTimeout(() => ws.close({ code: 4003, reason: 'e2e: dropped' }), 200);
        return;
      }
      if (f?.op === 'send' && drop.mode === 'reply') {
        drop.mode = null;
        swallowId = f.id;
        swallowCmid = f.cmid;
      }
      server.send(m);
    });
    server.onMessage((m) => {
      let f = null;
      try {
        f = JSON.parse(m);
      } catch {
        // not JSON: pass through
      }
      if (process.env.CHATLOG_E2E_DEBUG) console.log('alice ←', m);
      if (swallowCmid && f?.ev === 'event' && f.event.cmid === swallowCmid) return;
      if (swallowId !== null && f?.id === swallowId) {
        swallowId = null;
        swallowCmid = null;
        drop.closes += 1;
        ws.close({ code: 4003, reason: 'e2e: reply dropped' });
        server.close();
        return;
      }
      ws.send(m);
    });
    server.onClose((code, reason) => ws.close({ code, reason }));
    ws.onClose(() => server.close());
  });
}

async function main() {
  const started = Date.now();
  const killer = setTimeout(() => {
    console.error(`run.mjs: over ${RUN_MS_MAX} ms, stopping`);
    for (const c of children) c.kill('SIGKILL');
    process.exit(1);
  }, RUN_MS_MAX);
  ctx.browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: CHROMIUM_ARGS });
  let passed = 0;
  let failed = 0;
  for (const s of steps) {
    const t0 = Date.now();
    try {
      await s.fn();
      passed += 1;
      console.log(`ok    ${s.name} (${Date.now() - t0} ms)`);
    } catch (e) {
      failed += 1;
      console.log(`FAIL  ${s.name} (${Date.now() - t0} ms)\n${e.stack ?? e}`);
      await shot('failure');
      break;
    }
  }
  const skipped = steps.length - passed - failed;
  await ctx.browser.close().catch(() => {});
  await ctx.server?.stop().catch(() => {});
  for (const c of children) c.kill('SIGKILL');
  clearTimeout(killer);
  console.log(`web e2e: ${Date.now() - started} ms, screenshots in ${ARTIFACTS}`);
  console.log(`${passed} passed, ${failed + skipped} failed`);
  process.exit(failed + skipped ? 1 : 0);
}

process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
});

await main();
