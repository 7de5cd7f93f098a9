// One WebSocket session at a time to /v1/ws, speaking PROTOCOL.md: `hello` (with `since`, so a
// reconnect resumes where the page is), requests with ids and their replies, pushes. It
// reconnects by itself with backoff after a drop, a server restart or an idle connection, and
// stops only when told to or when the token is refused.

/** Reconnect delays grow from this … */
const RECONNECT_MS_MIN = 250;
/** … to at most this (plus up to 30 % jitter). */
const RECONNECT_MS_MAX = 5000;
/** The page pings this often; a ping unanswered within PING_TIMEOUT_MS ends the socket. */
const PING_EVERY_MS = 20000;
const PING_TIMEOUT_MS = 10000;
/** A request without a reply for this long fails (the socket stays). */
const REQUEST_TIMEOUT_MS = 30000;

/** A failed request: `code` is the protocol's error code, or `disconnected`/`timeout`. */
export class RequestError extends Error {
  constructor(code, message, retryAfterMs) {
    super(message || code);
    this.code = code;
    this.retryAfterMs = retryAfterMs ?? null;
  }
}

export class Connection {
  /**
   * @param {object} o
   * @param {string} o.url            ws:// or wss:// URL of /v1/ws
   * @param {string} o.token          the JWT
   * @param {string} o.device         device id (stable per browser and user)
   * @param {() => object} o.since    `since` for hello (chat → seq)
   * @param {(frame: object) => void} o.onPush   every push (`ev` frames), in order
   * @param {(state: string, detail?: object) => void} o.onState
   *   `connecting`, `syncing` (welcome received: backlog follows), `online` (synced),
   *   `offline` (detail.retryInMs), `unauthorized` (detail.message), `stopped`
   */
  constructor(o) {
    Object.assign(this, o);
    this.ws = null;
    this.nextId = 1;
    this.inflight = new Map();
    this.attempt = 0;
    this.stopped = false;
    this.state = 'idle';
    this.timer = null;
    this.pingTimer = null;
    this.user = null;
  }

  start() {
    this.stopped = false;
    this.open();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearInterval(this.pingTimer);
    if (this.ws) this.ws.close(1000, 'signed out');
    this.setState('stopped');
  }

  /** Drops the socket now and reconnects at once (used after the page was offline). */
  kick() {
    if (this.stopped) return;
    if (this.state === 'offline') {
      clearTimeout(this.timer);
      this.attempt = 0;
      this.open();
    }
  }

  setState(s, detail) {
    this.state = s;
    this.onState(s, detail);
  }

  open() {
    clearTimeout(this.timer);
    this.setState('connecting');
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (e) {
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    let authFailed = null;
    ws.onopen = () => {
      const hello = { op: 'hello', id: 'hello', token: this.token, device: this.device };
      const since = this.since();
      if (Object.keys(since).length) hello.since = since;
      ws.send(JSON.stringify(hello));
    };
    ws.onmessage = (m) => {
      let f;
      try {
        f = JSON.parse(m.data);
      } catch {
        return;
      }
      if (f.ev === 'welcome') {
        this.user = f.user;
        this.attempt = 0;
        this.setState('syncing', { user: f.user, device: f.device });
        return;
      }
      if (f.ev === 'synced') {
        this.setState('online');
        this.startPings(ws);
        return;
      }
      if (f.ev !== undefined) {
        this.onPush(f);
        return;
      }
      if (f.id === 'hello' && f.error) {
        authFailed = f.error;
        return;
      }
      if (f.id === undefined && f.error?.code === 'unauthorized') {
        authFailed = f.error; // token expired on an open connection
        return;
      }
      const r = this.inflight.get(f.id);
      if (!r) return;
      this.inflight.delete(f.id);
      clearTimeout(r.timer);
      if (f.error) r.reject(new RequestError(f.error.code, f.error.message, f.error.retry_after_ms));
      else r.resolve(f.result ?? {});
    };
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      clearInterval(this.pingTimer);
      for (const r of this.inflight.values()) {
        clearTimeout(r.timer);
        r.reject(new RequestError('disconnected', 'the connection dropped'));
      }
      this.inflight.clear();
      if (this.stopped) return;
      if (e.code === 1008 || authFailed?.code === 'unauthorized') {
        this.stopped = true;
        this.setState('unauthorized', { message: authFailed?.message ?? e.reason ?? 'authentication failed' });
        return;
      }
      this.scheduleReconnect();
    };
  }

  scheduleReconnect() {
    const base = Math.min(RECONNECT_MS_MAX, RECONNECT_MS_MIN * 2 ** this.attempt);
    const delay = Math.round(base * (1 + Math.random() * 0.3));
    this.attempt += 1;
    this.setState('offline', { retryInMs: delay });
    this.timer = setTimeout(() => this.open(), delay);
  }

  startPings(ws) {
    clearInterval(this.pingTimer);
    this.pingTimer = setInterval(() => {
      if (this.ws !== ws) return;
      const sent = this.request('ping', {}, PING_TIMEOUT_MS);
      sent.catch((e) => {
        // No answer: the socket is dead even if the browser has not noticed yet.
        if (e.code === 'timeout' && this.ws === ws) ws.close(4002, 'ping timeout');
      });
    }, PING_EVERY_MS);
  }

  /** Sends a request; resolves with its `result`, rejects with a RequestError. */
  request(op, fields, timeoutMs = REQUEST_TIMEOUT_MS) {
    const ws = this.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN || this.state !== 'online') {
      return Promise.reject(new RequestError('disconnected', 'not connected'));
    }
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        if (this.inflight.delete(id)) reject(new RequestError('timeout', `${op}: no reply`));
      }, timeoutMs);
      this.inflight.set(id, { resolve, reject, timer });
      ws.send(JSON.stringify({ op, id, ...fields }));
    });
  }

  get online() {
    return this.state === 'online';
  }
}

/** Uploads a file (POST /v1/files); resolves with `{file, size, sha256, content_type}`. */
export async function uploadFile(token, blob) {
  const r = await fetch('/v1/files', {
    method: 'POST',
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': blob.type || 'application/octet-stream' },
    body: blob,
  });
  const body = await r.json().catch(() => ({}));
  if (r.status !== 201) {
    const err = new RequestError(body.error?.code ?? `http_${r.status}`, body.error?.message ?? r.statusText);
    err.status = r.status;
    throw err;
  }
  return body;
}

/** Downloads a file (GET /v1/files/{id}) as a Blob. */
export async function downloadFile(token, id) {
  const r = await fetch(`/v1/files/${encodeURIComponent(id)}`, {
    headers: { Authorization: `Bearer ${token}` },
  });
  if (!r.ok) throw new RequestError(`http_${r.status}`, r.statusText);
  return r.blob();
}

/** Asks a dev-mode server for a token (POST /v1/dev/token); null when not in dev mode. */
export async function devToken(user) {
  const r = await fetch('/v1/dev/token', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ user }),
  });
  if (r.status === 404) return null;
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new RequestError(body.error?.code ?? `http_${r.status}`, body.error?.message ?? r.statusText);
  return body.token;
}

/** Whether the server offers dev tokens (a request it refuses as bad, rather than 404). */
export async function devTokensOffered() {
  try {
    const r = await fetch('/v1/dev/token', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: '{}',
    });
    return r.status !== 404;
  } catch {
    return false;
  }
}

/** The `sub` of a JWT (display only; the server checks the token). */
export function tokenUser(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(part)).sub ?? null;
  } catch {
    return null;
  }
}
