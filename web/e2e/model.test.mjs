// Unit tests of the page's state (web/public/model.js): `node --test web/e2e/`.
import assert from 'node:assert/strict';
import test from 'node:test';
import * as M from '../public/model.js';

const msg = (seq, body, extra = {}) => ({ chat: 'c', seq, kind: 'message', sender: 'bob', ts: seq * 1000, cmid: `b${seq}`, body, file: null, ...extra });

test('an event seen twice (push, resume, history) is stored once', () => {
  const s = new M.Store('alice');
  assert.equal(s.addEvent(msg(1, 'a')), true);
  assert.equal(s.addEvent(msg(1, 'a')), false);
  s.addHistory('c', { events: [msg(1, 'a'), msg(2, 'b')], last_seq: 2 });
  assert.deepEqual(M.rows(s, 'c').map((r) => r.seq), [1, 2]);
});

test('hi is the top of the gapless run; since() resumes from it', () => {
  const s = new M.Store('alice');
  s.addEvent(msg(5, 'e'));
  s.addEvent(msg(7, 'g'));
  assert.deepEqual(s.since(), { c: 5 });
  s.addEvent(msg(6, 'f'));
  assert.deepEqual(s.since(), { c: 7 });
  // An older history page joins below.
  s.addHistory('c', { events: [msg(3, 'c'), msg(4, 'd')], last_seq: 7 }, 5);
  assert.equal(s.chat('c').lo, 3);
  assert.deepEqual(s.since(), { c: 7 });
});

test('edits and deletes apply in seq order whatever order they arrive in', () => {
  const s = new M.Store('alice');
  const c = s.chat('c');
  // An edit arrives before its target is loaded.
  s.addEvent({ chat: 'c', seq: 3, kind: 'edit', sender: 'bob', ts: 3, target: 1, body: 'v2' });
  s.addHistory('c', { events: [msg(1, 'v1')], last_seq: 2 }, 2);
  assert.equal(M.messageView(c, c.messages.get(1)).body, 'v2');
  // A history snapshot taken after a later edit wins over an older known edit.
  s.addHistory('c', { events: [msg(1, 'v3', { edited: true })], last_seq: 9 });
  assert.equal(M.messageView(c, c.messages.get(1)).body, 'v3');
  s.addEvent({ chat: 'c', seq: 10, kind: 'edit', sender: 'bob', ts: 10, target: 1, body: 'v4' });
  assert.deepEqual(M.messageView(c, c.messages.get(1)), { deleted: false, edited: true, body: 'v4' });
  s.addEvent({ chat: 'c', seq: 11, kind: 'delete', sender: 'bob', ts: 11, target: 1 });
  assert.deepEqual(M.messageView(c, c.messages.get(1)), { deleted: true, edited: true, body: null });
  // A stale snapshot never brings a deleted message back.
  s.addEvent(msg(1, 'v1'));
  assert.equal(M.messageView(c, c.messages.get(1)).deleted, true);
});

test('a pending send is replaced by its message once, by reply or by push', () => {
  const s = new M.Store('alice');
  s.addPending({ cmid: 'x1', chat: 'c', body: 'hi', ts: 1 });
  s.addPending({ cmid: 'x2', chat: 'c', body: 'there', ts: 2 });
  assert.deepEqual(M.rows(s, 'c').map((r) => r.kind), ['pending', 'pending']);
  s.confirmSend(s.pending.get('x1'), { seq: 4, ts: 40 });
  s.addEvent({ ...msg(4, 'hi'), sender: 'alice', cmid: 'x1' });
  s.addEvent({ ...msg(5, 'there'), sender: 'alice', cmid: 'x2' });
  assert.equal(s.pending.size, 0);
  assert.deepEqual(M.rows(s, 'c').map((r) => [r.kind, r.seq]), [['message', 4], ['message', 5]]);
});

test('the outbox survives a reload with its cmids', () => {
  const s = new M.Store('alice');
  s.addPending({ cmid: 'x1', chat: 'c', body: 'hi', ts: 1 });
  s.addPending({ cmid: 'x2', chat: 'c', body: null, upload: {}, ts: 2 }); // file not uploaded yet
  const saved = JSON.parse(JSON.stringify(s.savedPending()));
  const t = new M.Store('alice');
  t.restorePending(saved);
  assert.deepEqual([...t.pending.keys()], ['x1']);
  assert.equal(t.pending.get('x1').state, 'queued');
});

test('ticks: sent, then delivered and read once every other member has it', () => {
  const s = new M.Store('alice');
  const c = s.chat('c');
  c.members = ['alice', 'bob', 'carol'];
  assert.equal(M.tick(c, 'alice', 3), 'sent');
  s.applyReceipt({ chat: 'c', user: 'bob', delivered: 3, read: 3 });
  assert.equal(M.tick(c, 'alice', 3), 'sent');
  s.applyReceipt({ chat: 'c', user: 'carol', delivered: 5, read: 0 });
  assert.equal(M.tick(c, 'alice', 3), 'delivered');
  s.applyReceipt({ chat: 'c', user: 'carol', delivered: 2, read: 4 });
  assert.equal(M.tick(c, 'alice', 3), 'read');
  assert.deepEqual(c.receipts.get('carol'), { delivered: 5, read: 4 }, 'cursors never go back');
});

test('unread counts messages from others after my read cursor', () => {
  const s = new M.Store('alice');
  const c = s.chat('c');
  s.addHistory('c', { events: [msg(1, 'a'), { ...msg(2, 'b'), sender: 'alice' }, msg(3, 'c'), msg(4, 'd')], last_seq: 4 });
  s.applyReceipt({ chat: 'c', user: 'alice', delivered: 1, read: 1 });
  assert.deepEqual(M.unread(c, 'alice'), { count: 2, more: false });
  s.addEvent({ chat: 'c', seq: 5, kind: 'delete', sender: 'bob', ts: 5, target: 4 });
  assert.equal(M.unread(c, 'alice').count, 1);
});

test('typing shows for a while and disappears', () => {
  const s = new M.Store('alice');
  s.typing('c', 'bob', 1000);
  assert.deepEqual(s.typingUsers('c', 1000 + M.TYPING_SHOW_MS - 1), ['bob']);
  assert.deepEqual(s.typingUsers('c', 1000 + M.TYPING_SHOW_MS), []);
  s.typing('c', 'bob', 0);
  s.addEvent(msg(1, 'done typing'));
  assert.deepEqual(s.typingUsers('c', 1), []);
});

test('names, direct peers and notices', () => {
  const s = new M.Store('alice');
  s.addEvent({ chat: 'd', seq: 1, kind: 'members', sender: 'alice', ts: 1, added: ['alice', 'bob'], removed: [], title: null });
  const d = s.chat('d');
  assert.equal(M.chatName(d, 'alice'), 'bob');
  assert.equal(M.directPeer(d, 'alice'), 'bob');
  assert.equal(M.noticeText(d.notices.get(1)), 'alice started the chat with bob');
  s.addEvent({ chat: 'd', seq: 2, kind: 'members', sender: 'bob', ts: 2, added: [], removed: ['bob'], title: null });
  assert.equal(M.noticeText(d.notices.get(2)), 'bob left');
  assert.deepEqual(d.members, ['alice']);
  assert.equal(M.ago(0, 90 * 60 * 1000), '2 h ago');
});
