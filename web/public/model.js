// The page's state as plain data and functions of it: no DOM, no socket, no clock reads (time
// is passed in), so node's test runner checks it directly (web/e2e/model.test.mjs).
//
// What the screen shows is derived from this state only, and the state is keyed the way the
// protocol keys events: a chat's events by `seq`, the outbox by `cmid`. An event that arrives
// twice (resume after a drop, a history page overlapping a push, a send reply racing its own
// push) lands on the same key, so nothing is ever shown twice; an unacknowledged send keeps its
// `cmid` across retries, so the server stores it once.

/** Events per history request. */
export const HISTORY_PAGE = 50;
/** How long "x is typing" stays after the last typing push. */
export const TYPING_SHOW_MS = 4000;
/** At most one `typing` op per this interval while the user types. */
export const TYPING_SEND_EVERY_MS = 2500;

/** A chat as the page knows it. */
export function newChat(id) {
  return {
    id,
    title: null,
    members: [],
    creator: null,
    removed: false,
    lastSeq: 0,
    // My user-level cursors (max over my devices), from list_chats and receipt pushes.
    read: 0,
    delivered: 0,
    // Every seq seen (any kind), the lowest one, and the top of the gapless run from it.
    seqs: new Set(),
    lo: null,
    hi: null,
    // seq → message; events of the other kinds only change these.
    messages: new Map(),
    // seq → members event (shown as a line in the conversation).
    notices: new Map(),
    // target seq → the latest edit known {at, body}; targets known to be deleted.
    edits: new Map(),
    deletes: new Set(),
    // user → {delivered, read}
    receipts: new Map(),
    // user → ms until which "typing" shows
    typing: new Map(),
    // History reached the first kept event: nothing older to load.
    olderDone: false,
  };
}

/** The page's whole state for one signed-in user. */
export class Store {
  constructor(me) {
    this.me = me;
    /** chat id → chat */
    this.chats = new Map();
    /** cmid → pending send (insertion order = send order) */
    this.pending = new Map();
    /** user → {online, last_seen} */
    this.presence = new Map();
  }

  chat(id) {
    let c = this.chats.get(id);
    if (!c) {
      c = newChat(id);
      this.chats.set(id, c);
    }
    return c;
  }

  /** Applies a `list_chats` result; returns the ids of chats that are new to the page. */
  applyChatList(chats) {
    const fresh = [];
    for (const info of chats) {
      if (!this.chats.has(info.chat)) fresh.push(info.chat);
      const c = this.chat(info.chat);
      if (info.title !== undefined && info.title !== null) c.title = info.title;
      c.members = [...info.members];
      c.lastSeq = Math.max(c.lastSeq, info.last_seq);
      c.read = Math.max(c.read, info.read);
      c.delivered = Math.max(c.delivered, info.delivered, info.read);
      c.removed = !c.members.includes(this.me);
    }
    return fresh;
  }

  /**
   * Applies one event from a live push, the resume backlog or a history page. `snapAt` is the
   * chat's last_seq at the time a history page was read (the message state it carries is that
   * recent); for pushes it is omitted. Returns false for an event already known.
   */
  addEvent(ev, snapAt) {
    const c = this.chat(ev.chat);
    const known = c.seqs.has(ev.seq);
    if (!known) markSeq(c, ev.seq);
    c.lastSeq = Math.max(c.lastSeq, ev.seq);
    switch (ev.kind) {
      case 'message': {
        const at = snapAt ?? ev.seq;
        const old = c.messages.get(ev.seq);
        const deleted = ev.deleted === true || (old?.snapDeleted ?? false);
        if (!old || at >= old.snapAt) {
          c.messages.set(ev.seq, {
            seq: ev.seq,
            sender: ev.sender,
            ts: ev.ts,
            cmid: ev.cmid,
            file: ev.file ?? null,
            snapBody: ev.body ?? null,
            snapAt: at,
            snapEdited: ev.edited === true || (old?.snapEdited ?? false),
            snapDeleted: deleted,
          });
        } else if (deleted) {
          old.snapDeleted = true;
        }
        if (ev.sender === this.me) this.pending.delete(ev.cmid);
        c.typing.delete(ev.sender);
        break;
      }
      case 'edit': {
        const e = c.edits.get(ev.target);
        if (!e || e.at < ev.seq) c.edits.set(ev.target, { at: ev.seq, body: ev.body });
        break;
      }
      case 'delete':
        c.deletes.add(ev.target);
        break;
      case 'members': {
        c.notices.set(ev.seq, {
          seq: ev.seq,
          sender: ev.sender,
          ts: ev.ts,
          added: ev.added ?? [],
          removed: ev.removed ?? [],
          title: ev.title ?? null,
        });
        if (ev.seq === 1) c.creator = ev.sender;
        if (ev.title) c.title = ev.title;
        // Membership from the events only when they are the newest thing known; list_chats
        // is the authority otherwise.
        if (ev.seq >= c.lastSeq) {
          const set = new Set(c.members);
          for (const u of ev.added ?? []) set.add(u);
          for (const u of ev.removed ?? []) set.delete(u);
          c.members = [...set].sort();
          c.removed = !set.has(this.me);
        }
        break;
      }
      default:
        break;
    }
    return !known;
  }

  /** Applies a `history` result for `chatId` (with the `before` it was asked with, if any). */
  addHistory(chatId, result, before) {
    const c = this.chat(chatId);
    for (const ev of result.events) this.addEvent(ev, result.last_seq);
    c.lastSeq = Math.max(c.lastSeq, result.last_seq);
    const first = result.events.length ? result.events[0].seq : before ?? result.last_seq + 1;
    const floor = Math.max(1, result.horizon ?? 1);
    if (first <= floor || (before !== undefined && result.events.length === 0)) {
      c.olderDone = true;
    }
    if (result.last_seq === 0) c.olderDone = true;
  }

  /** A `send` reply: the message is stored at `seq` even before its own push arrives. */
  confirmSend(p, result) {
    this.addEvent({
      chat: p.chat,
      seq: result.seq,
      kind: 'message',
      sender: this.me,
      ts: result.ts,
      cmid: p.cmid,
      body: p.body ?? null,
      file: p.file ?? null,
    });
    this.pending.delete(p.cmid);
  }

  applyReceipt(r) {
    const c = this.chat(r.chat);
    const old = c.receipts.get(r.user) ?? { delivered: 0, read: 0 };
    c.receipts.set(r.user, {
      delivered: Math.max(old.delivered, r.delivered, r.read),
      read: Math.max(old.read, r.read),
    });
    if (r.user === this.me) {
      c.read = Math.max(c.read, r.read);
      c.delivered = Math.max(c.delivered, r.delivered, r.read);
    }
  }

  applyPresence(p) {
    this.presence.set(p.user, { online: p.online, last_seen: p.last_seen ?? null });
  }

  typing(chatId, user, nowMs) {
    this.chat(chatId).typing.set(user, nowMs + TYPING_SHOW_MS);
  }

  /** Users currently typing in a chat (other than me). */
  typingUsers(chatId, nowMs) {
    const c = this.chats.get(chatId);
    if (!c) return [];
    const out = [];
    for (const [user, until] of c.typing) {
      if (until > nowMs && user !== this.me) out.push(user);
      else c.typing.delete(user);
    }
    return out.sort();
  }

  /** `hello`'s `since`: per chat, the top of the gapless run seen (resume sends the rest). */
  since() {
    const out = {};
    for (const c of this.chats.values()) if (c.hi !== null) out[c.id] = c.hi;
    return out;
  }

  /** Adds a send to the outbox. */
  addPending(p) {
    this.pending.set(p.cmid, { state: 'queued', error: null, ...p });
  }

  /** What survives a reload: sends whose content is known (text, or an uploaded file). */
  savedPending() {
    return [...this.pending.values()]
      .filter((p) => p.state !== 'failed' && (p.file || !p.upload))
      .map((p) => ({ cmid: p.cmid, chat: p.chat, body: p.body ?? null, file: p.file ?? null, ts: p.ts }));
  }

  restorePending(list) {
    for (const p of list ?? []) {
      if (typeof p?.cmid === 'string' && typeof p.chat === 'string' && !this.pending.has(p.cmid)) {
        this.addPending({ cmid: p.cmid, chat: p.chat, body: p.body ?? null, file: p.file ?? null, ts: p.ts ?? 0 });
      }
    }
  }
}

/** Records `seq` as seen and moves `lo`/`hi`. */
function markSeq(c, seq) {
  c.seqs.add(seq);
  if (c.lo === null || seq < c.lo) {
    c.lo = seq;
    let h = seq;
    while (c.seqs.has(h + 1)) h += 1;
    c.hi = h;
  } else if (seq === c.hi + 1) {
    let h = seq;
    while (c.seqs.has(h + 1)) h += 1;
    c.hi = h;
  }
}

/** The message as it is now: its text after the latest known edit, and whether deleted. */
export function messageView(c, m) {
  const deleted = m.snapDeleted || c.deletes.has(m.seq);
  const e = c.edits.get(m.seq);
  const newer = e && e.at > m.snapAt;
  return {
    deleted,
    edited: m.snapEdited || e !== undefined,
    body: deleted ? null : newer ? e.body : m.snapBody,
  };
}

/**
 * The tick of my message at `seq`: `read` once every other member read it, `delivered` once
 * every other member's devices have it, else `sent`.
 */
export function tick(c, me, seq) {
  const others = c.members.filter((u) => u !== me);
  if (others.length === 0) return 'sent';
  const r = (u) => c.receipts.get(u) ?? { delivered: 0, read: 0 };
  if (others.every((u) => r(u).read >= seq)) return 'read';
  if (others.every((u) => r(u).delivered >= seq)) return 'delivered';
  return 'sent';
}

/** Unread messages from others after my read cursor; `more` if older unread are not loaded. */
export function unread(c, me) {
  let count = 0;
  for (const m of c.messages.values()) {
    if (m.seq > c.read && m.sender !== me && !messageView(c, m).deleted) count += 1;
  }
  const more = c.lo !== null && c.lo > c.read + 1 && !c.olderDone;
  return { count, more };
}

/** What to call a chat: its title, or for an untitled two-person chat the other person. */
export function chatName(c, me) {
  if (c.title) return c.title;
  const others = c.members.filter((u) => u !== me);
  if (others.length === 1) return others[0];
  if (others.length === 0) return me;
  return others.join(', ');
}

/** The other person of an untitled two-person chat, else null. */
export function directPeer(c, me) {
  if (c.title) return null;
  const others = c.members.filter((u) => u !== me);
  return others.length === 1 && c.members.length === 2 ? others[0] : null;
}

/** The conversation's rows in order: notices and messages by seq, then pending sends. */
export function rows(store, chatId) {
  const c = store.chats.get(chatId);
  const out = [];
  for (const n of c?.notices.values() ?? []) out.push({ kind: 'notice', seq: n.seq, notice: n });
  for (const m of c?.messages.values() ?? []) out.push({ kind: 'message', seq: m.seq, message: m });
  out.sort((a, b) => a.seq - b.seq);
  for (const p of store.pending.values()) if (p.chat === chatId) out.push({ kind: 'pending', pending: p });
  return out;
}

/** "5 min ago" style text for a past time. */
export function ago(ms, nowMs) {
  const s = Math.max(0, Math.round((nowMs - ms) / 1000));
  if (s < 45) return 'just now';
  const m = Math.round(s / 60);
  if (m < 60) return `${m} min ago`;
  const h = Math.round(m / 60);
  if (h < 24) return `${h} h ago`;
  return `${Math.round(h / 24)} d ago`;
}

/** A notice line for a members event. */
export function noticeText(n) {
  if (n.seq === 1) {
    const others = n.added.filter((u) => u !== n.sender);
    const what = n.title ? `created “${n.title}”` : 'started the chat';
    return others.length ? `${n.sender} ${what} with ${others.join(', ')}` : `${n.sender} ${what}`;
  }
  const parts = [];
  if (n.added.length) parts.push(`added ${n.added.join(', ')}`);
  if (n.removed.length) {
    parts.push(n.removed.length === 1 && n.removed[0] === n.sender ? 'left' : `removed ${n.removed.join(', ')}`);
  }
  return `${n.sender} ${parts.join(' and ') || 'changed the members'}`;
}
