// The page: sign-in, chat list, conversation, composer. State lives in model.js's Store; the
// socket in client.js's Connection; this file turns pushes and replies into state and state
// into DOM. Everything shown is rendered from the Store, keyed by chat+seq (or cmid for sends
// not yet acknowledged), so resumes and retries can never show a message twice.

import { Connection, RequestError, uploadFile, downloadFile, devToken, devTokensOffered, tokenUser } from '/web/client.js';
import * as M from '/web/model.js';

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = 'chatlog.token';
const OPEN_KEY = 'chatlog.open';
/** Chats whose latest page is loaded right after sign-in (for previews and unread counts). */
const PRELOAD_CHATS_MAX = 100;
/** Users per presence request (the protocol's cap) … */
const PRESENCE_USERS_PER_REQUEST_MAX = 256;
/** … and watched per connection (the server's cap). */
const PRESENCE_WATCHES_MAX = 1024;
/** Pages fetched to close a gap after a reconnect before giving up until the next one. */
const CATCH_UP_PAGES_MAX = 20;
/** A failed attachment download is tried again on a render this much later. */
const FILE_RETRY_MS = 10000;

const S = {
  token: null,
  store: null,
  conn: null,
  open: null,
  editing: null,
  files: new Map(), // file id → {state: 'loading'|'ready'|'error', url, type, size}
  acked: new Map(), // chat → {delivered, read} acknowledged by the server
  watched: new Set(), // users watched with subscribe_presence on this connection
  lastTypingSentMs: 0,
  renderQueued: false,
  listTimer: null,
  ackTimer: null, // set while an acknowledgement round is scheduled
  flushTimer: null,
  loadingOlder: false,
  rows: new Map(), // row key → {li, sig}
};

// ---------------------------------------------------------------- sign-in

function showSignIn(message) {
  $('app').hidden = true;
  $('signin').hidden = false;
  $('signin-error').textContent = message ?? '';
  document.body.dataset.conn = 'signed-out';
  devTokensOffered().then((offered) => {
    $('dev-form').hidden = !offered;
  });
  $('token').focus();
}

$('token-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const token = $('token').value.trim();
  if (!tokenUser(token)) {
    $('signin-error').textContent = 'That does not look like a token (three dot-separated parts).';
    return;
  }
  signIn(token);
});

$('dev-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  try {
    const token = await devToken($('dev-user').value.trim());
    if (!token) {
      $('signin-error').textContent = 'This server does not hand out demo tokens.';
      $('dev-form').hidden = true;
      return;
    }
    signIn(token);
  } catch (err) {
    $('signin-error').textContent = `Could not get a demo token: ${err.message}`;
  }
});

function signIn(token) {
  localStorage.setItem(TOKEN_KEY, token);
  $('token').value = '';
  startSession(token);
}

$('signout').addEventListener('click', () => {
  S.conn?.stop();
  localStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(OPEN_KEY);
  location.reload();
});

// ---------------------------------------------------------------- session

function randomHex(bytes) {
  const a = new Uint8Array(bytes);
  crypto.getRandomValues(a);
  return [...a].map((b) => b.toString(16).padStart(2, '0')).join('');
}

function deviceFor(user) {
  const key = `chatlog.device.${user}`;
  let d = localStorage.getItem(key);
  if (!d) {
    d = `web-${randomHex(6)}`;
    localStorage.setItem(key, d);
  }
  return d;
}

function pendingKey() {
  return `chatlog.pending.${S.store.me}`;
}

function savePending() {
  localStorage.setItem(pendingKey(), JSON.stringify(S.store.savedPending()));
}

function startSession(token) {
  const user = tokenUser(token);
  S.token = token;
  S.store = new M.Store(user);
  try {
    S.store.restorePending(JSON.parse(localStorage.getItem(pendingKey()) ?? '[]'));
  } catch {
    // A damaged saved outbox is dropped, not fatal.
  }
  S.open = sessionStorage.getItem(OPEN_KEY);
  $('signin').hidden = true;
  $('app').hidden = false;
  $('me').textContent = `Signed in as ${user}`;
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  S.conn = new Connection({
    url: `${scheme}://${location.host}/v1/ws`,
    token,
    device: deviceFor(user),
    since: () => S.store.since(),
    onPush,
    onState,
  });
  S.conn.start();
  render();
}

function onState(state, detail) {
  document.body.dataset.conn = state;
  const label = {
    connecting: 'Connecting…',
    syncing: 'Syncing…',
    online: 'Online',
    offline: `Offline — reconnecting in ${Math.ceil((detail?.retryInMs ?? 0) / 1000)} s`,
    stopped: 'Signed out',
  }[state];
  if (label) $('conn').textContent = label;
  if (state === 'syncing') S.watched.clear(); // subscriptions belong to a connection
  if (state === 'online') afterSync();
  if (state === 'unauthorized') {
    localStorage.removeItem(TOKEN_KEY);
    showSignIn(`Signed out: ${detail?.message ?? 'the token was refused'}.`);
  }
  render();
}

window.addEventListener('online', () => S.conn?.kick());
document.addEventListener('visibilitychange', () => scheduleAck());

function request(op, fields) {
  return S.conn.request(op, fields);
}

/** After every (re)connect: chats, missed events, receipts, presence, the outbox, acks. */
async function afterSync() {
  try {
    await refreshChats();
    const chats = [...S.store.chats.values()].slice(0, PRELOAD_CHATS_MAX);
    await Promise.all(chats.map((c) => ensureLoaded(c)));
    await Promise.all(chats.map((c) => loadReceipts(c.id)));
    await watchPresence();
  } catch (e) {
    if (!(e instanceof RequestError)) throw e;
  }
  flushOutbox();
  scheduleAck();
  render();
}

async function refreshChats() {
  const r = await request('list_chats', {});
  const fresh = S.store.applyChatList(r.chats);
  render();
  return fresh;
}

function scheduleChatList() {
  clearTimeout(S.listTimer);
  S.listTimer = setTimeout(async () => {
    try {
      const fresh = await refreshChats();
      for (const id of fresh) {
        const c = S.store.chat(id);
        await ensureLoaded(c);
        await loadReceipts(id);
      }
      await watchPresence();
    } catch (e) {
      if (!(e instanceof RequestError)) throw e;
    }
    render();
  }, 150);
}

/** Loads a chat's latest page if nothing is known, and closes any gap up to its last_seq. */
async function ensureLoaded(c) {
  if (c.removed) return;
  try {
    if (c.lo === null) {
      const r = await request('history', { chat: c.id, limit: M.HISTORY_PAGE });
      S.store.addHistory(c.id, r);
    }
    for (let i = 0; i < CATCH_UP_PAGES_MAX && c.hi !== null && c.hi < c.lastSeq; i += 1) {
      const r = await request('history', { chat: c.id, after: c.hi, limit: 500 });
      S.store.addHistory(c.id, r);
      if (r.events.length === 0) break;
    }
    // A chat whose known part is short (resume brought only its tail): fetch context too.
    if (c.lo !== null && c.lo > 1 && !c.olderDone && c.messages.size < 20) {
      await loadOlder(c);
    }
  } catch (e) {
    if (!(e instanceof RequestError)) throw e;
  }
  render();
}

async function loadOlder(c) {
  if (c.olderDone || c.lo === null) return;
  const before = c.lo;
  const r = await request('history', { chat: c.id, before, limit: M.HISTORY_PAGE });
  S.store.addHistory(c.id, r, before);
}

async function loadReceipts(chatId) {
  try {
    const r = await request('receipts', { chat: chatId });
    for (const x of r.receipts) S.store.applyReceipt({ chat: chatId, ...x });
  } catch (e) {
    if (!(e instanceof RequestError)) throw e;
  }
}

/** Watches everyone the user shares a chat with (once per connection and user). */
async function watchPresence() {
  const users = new Set();
  for (const c of S.store.chats.values()) for (const u of c.members) if (u !== S.store.me) users.add(u);
  const room = PRESENCE_WATCHES_MAX - S.watched.size;
  const fresh = [...users].filter((u) => !S.watched.has(u)).sort().slice(0, Math.max(0, room));
  for (let i = 0; i < fresh.length; i += PRESENCE_USERS_PER_REQUEST_MAX) {
    const list = fresh.slice(i, i + PRESENCE_USERS_PER_REQUEST_MAX);
    for (const u of list) S.watched.add(u);
    // Subscribe first, then ask: a change in between arrives as a push, never lost.
    await request('subscribe_presence', { users: list });
    const r = await request('presence', { users: list });
    for (const p of r.presence) S.store.applyPresence(p);
  }
  render();
}

function onPush(f) {
  const store = S.store;
  switch (f.ev) {
    case 'event': {
      const ev = f.event;
      const knownChat = store.chats.has(ev.chat) && store.chat(ev.chat).members.length > 0;
      store.addEvent(ev);
      if (!knownChat || ev.kind === 'members') scheduleChatList();
      scheduleAck();
      break;
    }
    case 'receipt':
      store.applyReceipt(f);
      break;
    case 'presence':
      store.applyPresence(f);
      break;
    case 'typing':
      store.typing(f.chat, f.user, Date.now());
      setTimeout(render, M.TYPING_SHOW_MS + 50);
      break;
    default:
      return;
  }
  render();
}

// ---------------------------------------------------------------- acknowledgements

/** Acknowledges within 200 ms of the first change (a throttle: a busy chat never starves it). */
function scheduleAck() {
  if (S.ackTimer !== null) return;
  S.ackTimer = setTimeout(() => {
    S.ackTimer = null;
    sendAcks();
  }, 200);
}

function conversationVisible() {
  if (document.visibilityState !== 'visible' || !S.open) return false;
  const el = $('scroller');
  return el.offsetParent !== null && el.scrollHeight - el.scrollTop - el.clientHeight < 80;
}

async function sendAcks() {
  if (!S.conn?.online) return;
  for (const c of S.store.chats.values()) {
    if (c.hi === null || c.removed) continue;
    const top = Math.min(c.hi, c.lastSeq);
    const a = S.acked.get(c.id) ?? { delivered: 0, read: 0 };
    S.acked.set(c.id, a);
    try {
      if (c.id === S.open && conversationVisible() && top > Math.max(a.read, c.read)) {
        await request('read', { chat: c.id, seq: top });
        a.read = Math.max(a.read, top);
        a.delivered = Math.max(a.delivered, top);
      } else if (top > a.delivered) {
        await request('delivered', { chat: c.id, seq: top });
        a.delivered = Math.max(a.delivered, top);
      }
    } catch (e) {
      if (!(e instanceof RequestError)) throw e;
    }
  }
}

// ---------------------------------------------------------------- outbox

function newCmid() {
  return `w${randomHex(12)}`;
}

function queueSend(chat, body, upload) {
  const p = { cmid: newCmid(), chat, body: body || null, file: null, ts: Date.now() };
  if (upload) {
    p.upload = upload;
    p.fileName = upload.name;
    if (upload.type.startsWith('image/')) p.previewUrl = URL.createObjectURL(upload);
  }
  S.store.addPending(p);
  savePending();
  render(true);
  flushOutbox();
}

function scheduleFlush(ms) {
  clearTimeout(S.flushTimer);
  S.flushTimer = setTimeout(flushOutbox, ms);
}

/** Sends every queued message in order, uploading attachments first; retries keep the cmid. */
function flushOutbox() {
  if (!S.conn?.online) return;
  for (const p of S.store.pending.values()) {
    if (p.state !== 'queued') continue;
    if (p.upload && !p.file) {
      p.state = 'uploading';
      uploadFile(S.token, p.upload).then(
        (r) => {
          p.file = r.file;
          p.state = 'queued';
          savePending();
          flushOutbox();
        },
        (e) => {
          if (e.status === 413 || e.status === 401) {
            p.state = 'failed';
            p.error = e.status === 413 ? 'file too large' : 'not signed in';
          } else {
            p.state = 'queued';
            scheduleFlush(2000);
          }
          render();
        },
      );
      // Later messages wait for this one: the order sent is the order shown.
      break;
    }
    p.state = 'sending';
    const fields = { chat: p.chat, cmid: p.cmid };
    if (p.body) fields.body = p.body;
    if (p.file) fields.file = p.file;
    request('send', fields).then(
      (r) => {
        S.store.confirmSend(p, r);
        savePending();
        scheduleAck();
        render();
      },
      (e) => {
        if (!S.store.pending.has(p.cmid)) return; // its push arrived first
        if (['disconnected', 'timeout', 'unavailable', 'internal', 'rate_limited'].includes(e.code)) {
          p.state = 'queued';
          if (e.code !== 'disconnected') scheduleFlush(e.retryAfterMs ?? 2000);
        } else {
          p.state = 'failed';
          p.error = e.message;
          savePending();
        }
        render();
      },
    );
  }
  render();
}

// ---------------------------------------------------------------- files

function fileState(id) {
  let f = S.files.get(id);
  if (!f || (f.state === 'error' && Date.now() > f.retryAtMs)) {
    f = { state: 'loading' };
    S.files.set(id, f);
    downloadFile(S.token, id).then(
      (blob) => {
        f.url = URL.createObjectURL(blob);
        f.type = blob.type;
        f.size = blob.size;
        f.state = 'ready';
        render();
      },
      () => {
        f.state = 'error';
        f.retryAtMs = Date.now() + FILE_RETRY_MS;
        render();
      },
    );
  }
  return f;
}

// ---------------------------------------------------------------- rendering

function render(stickToBottom) {
  if (stickToBottom) S.stick = true;
  if (S.renderQueued) return;
  S.renderQueued = true;
  setTimeout(() => {
    S.renderQueued = false;
    if (!S.store) return;
    renderChatList();
    renderConversation();
  }, 0);
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) e.append(c);
  return e;
}

function timeText(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

function presenceText(user) {
  const p = S.store.presence.get(user);
  if (!p) return '';
  if (p.online) return 'online';
  return p.last_seen ? `last seen ${M.ago(p.last_seen, Date.now())}` : 'offline';
}

function lastActivity(c) {
  let ts = 0;
  for (const m of c.messages.values()) ts = Math.max(ts, m.ts);
  for (const n of c.notices.values()) ts = Math.max(ts, n.ts);
  return ts;
}

function lastPreview(c) {
  let last = null;
  for (const m of c.messages.values()) if (!last || m.seq > last.seq) last = m;
  if (!last) return '';
  const v = M.messageView(c, last);
  const who = last.sender === S.store.me ? 'You' : last.sender;
  const text = v.deleted ? 'message deleted' : v.body ?? (last.file ? 'attachment' : '');
  return `${who}: ${text}`;
}

function sortedChats() {
  return [...S.store.chats.values()]
    .filter((c) => c.members.length > 0)
    .sort((a, b) => lastActivity(b) - lastActivity(a) || a.id.localeCompare(b.id));
}

function renderChatList() {
  const list = $('chat-list');
  const me = S.store.me;
  const chats = sortedChats();
  $('no-chats').hidden = chats.length > 0;
  const focusedChat = document.activeElement?.dataset?.chat;
  list.replaceChildren(
    ...chats.map((c) => {
      const u = M.unread(c, me);
      const peer = M.directPeer(c, me);
      const online = peer ? S.store.presence.get(peer)?.online === true : null;
      const unreadText = u.count || u.more ? `${u.count}${u.more ? '+' : ''}` : '';
      const name = M.chatName(c, me);
      const label = [name, peer ? (online ? 'online' : 'offline') : null, unreadText ? `${unreadText} unread` : null]
        .filter(Boolean)
        .join(', ');
      return el(
        'li',
        {},
        el(
          'button',
          {
            type: 'button',
            class: 'chat-item',
            dataset: { chat: c.id },
            'aria-current': c.id === S.open ? 'true' : null,
            'aria-label': label,
            onclick: () => openChat(c.id),
            onkeydown: chatListKeys,
          },
          peer ? el('span', { class: `dot ${online ? 'online' : 'offline'}`, 'aria-hidden': 'true' }) : null,
          el('span', { class: 'chat-text' }, el('span', { class: 'name' }, name), el('span', { class: 'preview' }, lastPreview(c))),
          unreadText ? el('span', { class: 'unread', 'aria-hidden': 'true' }, unreadText) : null,
        ),
      );
    }),
  );
  if (focusedChat) list.querySelector(`[data-chat="${CSS.escape(focusedChat)}"]`)?.focus();
}

function chatListKeys(e) {
  const items = [...$('chat-list').querySelectorAll('.chat-item')];
  const i = items.indexOf(e.currentTarget);
  let next = null;
  if (e.key === 'ArrowDown') next = items[Math.min(items.length - 1, i + 1)];
  else if (e.key === 'ArrowUp') next = items[Math.max(0, i - 1)];
  else if (e.key === 'Home') next = items[0];
  else if (e.key === 'End') next = items[items.length - 1];
  if (next) {
    e.preventDefault();
    next.focus();
  }
}

function tickGlyph(state) {
  return { sending: '◷', failed: '!', sent: '✓', delivered: '✓✓', read: '✓✓' }[state];
}

function attachmentNode(m) {
  if (!m.file) return null;
  const f = fileState(m.file);
  if (f.state === 'loading') return el('div', { class: 'attachment' }, 'Loading attachment…');
  if (f.state === 'error') return el('div', { class: 'attachment' }, 'Attachment unavailable');
  if (f.type.startsWith('image/')) {
    return el('div', { class: 'attachment' }, el('img', { src: f.url, alt: `Image from ${m.sender}`, loading: 'lazy' }));
  }
  return el(
    'div',
    { class: 'attachment' },
    el('a', { href: f.url, download: m.file }, `Download attachment (${f.type || 'file'}, ${f.size} bytes)`),
  );
}

function messageRow(c, m) {
  const me = S.store.me;
  const v = M.messageView(c, m);
  const mine = m.sender === me;
  const t = mine ? M.tick(c, me, m.seq) : null;
  const f = m.file ? S.files.get(m.file) : null;
  const sig = JSON.stringify([v, t, f?.state, S.editing === m.seq]);
  const build = () => {
    const tickLabel = { sent: 'sent', delivered: 'delivered', read: 'read' }[t];
    return el(
      'li',
      {
        class: `msg ${mine ? 'mine' : 'theirs'}${v.deleted ? ' deleted' : ''}${S.editing === m.seq ? ' being-edited' : ''}`,
        dataset: { seq: String(m.seq), cmid: m.cmid, sender: m.sender },
        tabindex: '-1',
      },
      el('div', { class: 'meta' }, el('span', { class: 'sender' }, mine ? 'You' : m.sender), ' ', el('time', { datetime: new Date(m.ts).toISOString() }, timeText(m.ts))),
      v.deleted
        ? el('div', { class: 'body tombstone' }, 'message deleted')
        : v.body !== null
          ? el('div', { class: 'body' }, v.body)
          : null,
      v.deleted ? null : attachmentNode(m),
      el(
        'div',
        { class: 'foot' },
        v.edited && !v.deleted ? el('span', { class: 'edited' }, 'edited') : null,
        mine ? el('span', { class: 'tick', dataset: { state: t }, 'aria-label': tickLabel, title: tickLabel }, tickGlyph(t)) : null,
        mine && !v.deleted
          ? el(
              'span',
              { class: 'actions' },
              v.body !== null
                ? el('button', { type: 'button', class: 'edit', 'aria-label': 'Edit message', onclick: () => startEdit(c.id, m.seq) }, 'Edit')
                : null,
              el('button', { type: 'button', class: 'delete', 'aria-label': 'Delete message', onclick: () => deleteMessage(c.id, m.seq) }, 'Delete'),
            )
          : null,
      ),
    );
  };
  return { key: `s${m.seq}`, sig, build };
}

function pendingRow(p) {
  const sig = JSON.stringify([p.state, p.error, p.file]);
  const build = () =>
    el(
      'li',
      { class: 'msg mine pending', dataset: { cmid: p.cmid, state: p.state }, tabindex: '-1' },
      el('div', { class: 'meta' }, el('span', { class: 'sender' }, 'You')),
      p.body ? el('div', { class: 'body' }, p.body) : null,
      p.previewUrl
        ? el('div', { class: 'attachment' }, el('img', { src: p.previewUrl, alt: `Image being sent: ${p.fileName}` }))
        : p.upload
          ? el('div', { class: 'attachment' }, `Attachment: ${p.fileName}`)
          : null,
      el(
        'div',
        { class: 'foot' },
        p.state === 'failed'
          ? [
              el('span', { class: 'error' }, `Not sent: ${p.error}`),
              el('button', { type: 'button', onclick: () => retrySend(p) }, 'Retry'),
              el('button', { type: 'button', onclick: () => discardSend(p) }, 'Discard'),
            ]
          : el('span', { class: 'tick', dataset: { state: 'sending' }, 'aria-label': 'sending', title: 'sending' }, tickGlyph('sending')),
      ),
    );
  return { key: `p${p.cmid}`, sig, build };
}

function noticeRow(n) {
  return {
    key: `s${n.seq}`,
    sig: 'n',
    build: () => el('li', { class: 'notice', dataset: { seq: String(n.seq) } }, M.noticeText(n)),
  };
}

function renderConversation() {
  const store = S.store;
  const c = S.open ? store.chats.get(S.open) : null;
  document.body.classList.toggle('chat-open', !!c);
  $('composer').hidden = !c || c.removed;
  if (!c) {
    $('chat-title').textContent = 'No chat open';
    $('chat-sub').textContent = store.chats.size ? 'Pick a chat from the list.' : '';
    $('messages').replaceChildren();
    S.rows.clear();
    $('load-older').hidden = true;
    $('typing').textContent = '';
    return;
  }
  const me = store.me;
  $('chat-title').textContent = M.chatName(c, me);
  const peer = M.directPeer(c, me);
  if (c.removed) $('chat-sub').textContent = 'You are no longer a member of this chat.';
  else if (peer) $('chat-sub').textContent = presenceText(peer);
  else {
    const online = c.members.filter((u) => u !== me && store.presence.get(u)?.online).length;
    $('chat-sub').textContent = `${c.members.join(', ')} · ${online} online`;
  }
  $('load-older').hidden = c.olderDone || c.lo === null || c.lo <= 1;

  const scroller = $('scroller');
  const fromBottom = scroller.scrollHeight - scroller.scrollTop;
  const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 80;
  const wanted = M.rows(store, c.id).map((r) =>
    r.kind === 'message' ? messageRow(c, r.message) : r.kind === 'pending' ? pendingRow(r.pending) : noticeRow(r.notice),
  );
  const list = $('messages');
  const keep = new Map();
  const focused = document.activeElement;
  let prev = null;
  for (const w of wanted) {
    let row = S.rows.get(w.key);
    if (!row || row.sig !== w.sig) {
      const li = w.build();
      if (row) {
        const hadFocus = row.li.contains(focused);
        row.li.replaceWith(li);
        if (hadFocus) li.focus();
      }
      row = { li, sig: w.sig };
    }
    keep.set(w.key, row);
    const want = prev ? prev.nextSibling : list.firstChild;
    if (want !== row.li) list.insertBefore(row.li, want);
    prev = row.li;
  }
  for (const [key, row] of S.rows) if (!keep.has(key)) row.li.remove();
  S.rows = keep;

  if (S.keepOffset) {
    scroller.scrollTop = scroller.scrollHeight - fromBottom;
    S.keepOffset = false;
  } else if (atBottom || S.stick) {
    scroller.scrollTop = scroller.scrollHeight;
  }
  S.stick = false;

  const typing = store.typingUsers(c.id, Date.now());
  $('typing').textContent = typing.length
    ? `${typing.join(' and ')} ${typing.length === 1 ? 'is' : 'are'} typing…`
    : '';
  $('editing').hidden = S.editing === null;
  scheduleAck();
}

// ---------------------------------------------------------------- actions

function openChat(id) {
  if (S.open !== id) {
    S.rows.clear();
    $('messages').replaceChildren();
    cancelEdit();
  }
  S.open = id;
  sessionStorage.setItem(OPEN_KEY, id);
  const c = S.store.chat(id);
  render(true);
  if (S.conn.online) {
    ensureLoaded(c).then(() => render(true));
    loadReceipts(id).then(() => render());
  }
  $('text').focus();
}

$('back').addEventListener('click', () => {
  const id = S.open;
  S.open = null;
  sessionStorage.removeItem(OPEN_KEY);
  render();
  setTimeout(() => document.querySelector(`.chat-item[data-chat="${CSS.escape(id ?? '')}"]`)?.focus(), 10);
});

$('load-older').addEventListener('click', () => olderNow());
$('scroller').addEventListener('scroll', () => {
  if ($('scroller').scrollTop < 30 && !$('load-older').hidden) olderNow();
  scheduleAck();
});

async function olderNow() {
  const c = S.open ? S.store.chats.get(S.open) : null;
  if (!c || S.loadingOlder || !S.conn.online) return;
  S.loadingOlder = true;
  try {
    await loadOlder(c);
    S.keepOffset = true;
  } catch (e) {
    if (!(e instanceof RequestError)) throw e;
  } finally {
    S.loadingOlder = false;
  }
  render();
}

function startEdit(chatId, seq) {
  const c = S.store.chat(chatId);
  const m = c.messages.get(seq);
  if (!m) return;
  S.editing = seq;
  $('text').value = M.messageView(c, m).body ?? '';
  $('editing').hidden = false;
  render();
  $('text').focus();
}

function cancelEdit() {
  if (S.editing === null) return;
  S.editing = null;
  $('text').value = '';
  $('editing').hidden = true;
  render();
}

$('cancel-edit').addEventListener('click', () => {
  cancelEdit();
  $('text').focus();
});

function note(text) {
  $('conn').textContent = text;
}

async function deleteMessage(chatId, seq) {
  try {
    await request('delete', { chat: chatId, target: seq });
  } catch (e) {
    note(`Delete failed: ${e.message}`);
  }
}

function retrySend(p) {
  p.state = 'queued';
  p.error = null;
  savePending();
  flushOutbox();
}

function discardSend(p) {
  S.store.pending.delete(p.cmid);
  savePending();
  render();
}

$('composer').addEventListener('submit', async (e) => {
  e.preventDefault();
  const text = $('text').value.trim();
  const chat = S.open;
  if (!chat) return;
  if (S.editing !== null) {
    if (!text) return;
    const target = S.editing;
    try {
      await request('edit', { chat, target, body: text });
      cancelEdit();
    } catch (err) {
      note(`Edit failed: ${err.message}`);
    }
    return;
  }
  const files = $('attach').files;
  const file = files && files.length ? files[0] : null;
  if (!text && !file) return;
  $('text').value = '';
  $('attach').value = '';
  $('attach-name')?.remove();
  autosize();
  queueSend(chat, text, file);
});

$('attach').addEventListener('change', () => {
  const f = $('attach').files[0];
  $('attach-name')?.remove();
  if (f) {
    $('composer').querySelector('.row').before(el('p', { id: 'attach-name', class: 'hint' }, `Attached: ${f.name} — press Send`));
  }
});

function autosize() {
  const t = $('text');
  t.rows = Math.min(5, Math.max(1, t.value.split('\n').length));
}

$('text').addEventListener('input', () => {
  autosize();
  const now = Date.now();
  if (S.editing === null && $('text').value && S.open && S.conn?.online && now - S.lastTypingSentMs > M.TYPING_SEND_EVERY_MS) {
    S.lastTypingSentMs = now;
    request('typing', { chat: S.open }).catch(() => {});
  }
});

$('text').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $('composer').requestSubmit();
  } else if (e.key === 'Escape') {
    cancelEdit();
  } else if (e.key === 'ArrowUp' && !$('text').value && S.open) {
    // Edit my latest message, as in most chat apps.
    const c = S.store.chat(S.open);
    const mine = [...c.messages.values()]
      .filter((m) => m.sender === S.store.me && !M.messageView(c, m).deleted && M.messageView(c, m).body !== null)
      .sort((a, b) => b.seq - a.seq)[0];
    if (mine) {
      e.preventDefault();
      startEdit(c.id, mine.seq);
    }
  }
});

// Arrow keys move between messages in the log; Tab reaches their buttons.
$('messages').addEventListener('keydown', (e) => {
  if (e.key !== 'ArrowUp' && e.key !== 'ArrowDown') return;
  const items = [...$('messages').querySelectorAll('li')];
  if (!items.length) return;
  const current = items.indexOf(document.activeElement?.closest('li'));
  let i = current === -1 ? items.length - 1 : current + (e.key === 'ArrowDown' ? 1 : -1);
  i = Math.max(0, Math.min(items.length - 1, i));
  e.preventDefault();
  items[i].focus();
});

// Alt+ArrowUp / Alt+ArrowDown: previous / next chat from anywhere.
document.addEventListener('keydown', (e) => {
  if (!e.altKey || (e.key !== 'ArrowUp' && e.key !== 'ArrowDown') || !S.store) return;
  const chats = sortedChats();
  if (!chats.length) return;
  const i = chats.findIndex((c) => c.id === S.open);
  const j = i === -1 ? 0 : Math.max(0, Math.min(chats.length - 1, i + (e.key === 'ArrowDown' ? 1 : -1)));
  e.preventDefault();
  openChat(chats[j].id);
});

function parseUsers(text) {
  return text
    .split(/[\s,]+/)
    .map((u) => u.trim())
    .filter(Boolean);
}

async function createChat(fields) {
  $('new-chat-error').textContent = '';
  try {
    const r = await request('create_chat', fields);
    $('new-chat').open = false;
    scheduleChatList();
    openChat(r.chat);
    return true;
  } catch (e) {
    $('new-chat-error').textContent = `Could not create the chat: ${e.message}`;
    return false;
  }
}

$('direct-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const user = $('direct-user').value.trim();
  if (await createChat({ members: [user], direct: true })) $('direct-user').value = '';
});

$('group-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const fields = { members: parseUsers($('group-members').value) };
  const title = $('group-title').value.trim();
  if (title) fields.title = title;
  if (await createChat(fields)) {
    $('group-title').value = '';
    $('group-members').value = '';
  }
});

// Relative times ("last seen 3 min ago") and typing expiry.
setInterval(() => render(), 30000);

// ---------------------------------------------------------------- start

const saved = localStorage.getItem(TOKEN_KEY);
if (saved && tokenUser(saved)) startSession(saved);
else showSignIn();
