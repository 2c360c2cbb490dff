'use strict';
// Shared helpers for the scripts tests/pusher_clients.rs runs against a
// herald it started: the real pusher-js client (its Node build, WebSocket
// transport only) and the real Node `pusher` server library.
//
// Protocol with the Rust driver:
// - configuration comes from the environment: HERALD_ADDR (host:port),
//   APP_ID, APP_KEY, APP_SECRET, and HERALD_TLS=1 for wss:// and https://
//   (the CA in NODE_EXTRA_CA_CERTS);
// - stdout carries JSON lines only: `{"barrier": NAME, ...}` asks the driver
//   something and the script waits for one JSON line on stdin as the answer;
//   `{"result": {...}}` is the last line, after which the script exits 0;
// - on any failure the script prints `FAIL: ...` on stderr and exits 1.
//
// Every wait has a timeout and waits for an event (never a sleep), except
// `quiet()`, which checks that something does NOT happen in a bounded window.

const http = require('http');
const readline = require('readline');

function fail(msg) {
  process.stderr.write(`FAIL: ${msg}\n`);
  process.exit(1);
}

function load(name) {
  try {
    return require(name);
  } catch (e) {
    if (e && e.code === 'MODULE_NOT_FOUND') {
      fail(`cannot load the npm package '${name}' (${e.message.split('\n')[0]}): ` +
        'install the test dependencies with `sh scripts/test-deps.sh` (npm ci in tests/js)');
    }
    throw e;
  }
}

const PusherClient = load('pusher-js');
const PusherServer = load('pusher');

if (process.env.PUSHER_DEBUG) {
  PusherClient.log = (m) => process.stderr.write(`[pusher-js] ${m}\n`);
}

function need(name) {
  const v = process.env[name];
  if (!v) fail(`environment variable ${name} is not set`);
  return v;
}

const addr = need('HERALD_ADDR');
const sep = addr.lastIndexOf(':');
const cfg = {
  host: addr.slice(0, sep),
  port: Number(addr.slice(sep + 1)),
  appId: need('APP_ID'),
  key: need('APP_KEY'),
  secret: need('APP_SECRET'),
  tls: process.env.HERALD_TLS === '1',
};

/** How long one wait may take. */
const STEP_MS = Number(process.env.STEP_TIMEOUT_MS || 8000);
/** How long the whole script may take. */
const SCRIPT_MS = Number(process.env.SCRIPT_TIMEOUT_MS || 30000);

let currentStep = 'start';
function step(name) {
  currentStep = name;
  if (process.env.PUSHER_DEBUG) process.stderr.write(`step: ${name}\n`);
}
setTimeout(() => fail(`script did not finish within ${SCRIPT_MS} ms (step: ${currentStep})`), SCRIPT_MS).unref();

// ---------------------------------------------------------------- waiting

const waiters = new Set();

/** Re-checks every pending `until` (called whenever something is recorded). */
function changed() {
  for (const w of [...waiters]) w.check();
}

/**
 * Resolves with the first truthy value of `pred()`, re-evaluated whenever an
 * event is recorded; rejects after `ms` naming `what`, or when `pred` throws.
 */
function until(what, pred, ms = STEP_MS) {
  return new Promise((resolve, reject) => {
    let timer = null;
    const w = {
      check() {
        let v;
        try {
          v = pred();
        } catch (e) {
          finish();
          reject(e);
          return;
        }
        if (v) {
          finish();
          resolve(v);
        }
      },
    };
    function finish() {
      if (timer) clearTimeout(timer);
      waiters.delete(w);
    }
    timer = setTimeout(() => {
      waiters.delete(w);
      reject(new Error(`timed out after ${ms} ms waiting for ${what}`));
    }, ms);
    waiters.add(w);
    w.check();
  });
}

/** Polls an async condition every 20 ms (for state only observable by asking, like the HTTP API). */
async function poll(what, fn, ms = STEP_MS) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    last = await fn();
    if (last && last.ok) return last.value;
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${ms} ms waiting for ${what}; last: ${JSON.stringify(last && last.value)}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Lets `ms` pass: only for checking that something does NOT happen. */
function quiet(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

// ------------------------------------------------------------ auth endpoint

/**
 * The app's channel authorization endpoint, as a Pusher customer writes it
 * with the Node server library: `authorizeChannel(socket_id, channel,
 * presenceData)`. The user is the `user_id` parameter the client sends
 * (pusher-js `channelAuthorization.params`). Channels named `*-forged-*`
 * get an authorization signed with the wrong secret.
 */
class AuthServer {
  constructor() {
    this.requests = [];
    this.good = api();
    this.forger = api({ secret: 'not-the-app-secret' });
    this.server = http.createServer((req, res) => this.handle(req, res));
  }

  listen() {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(0, '127.0.0.1', () => {
        this.url = `http://127.0.0.1:${this.server.address().port}/pusher/auth`;
        this.userUrl = `http://127.0.0.1:${this.server.address().port}/pusher/user-auth`;
        resolve(this);
      });
    });
  }

  handle(req, res) {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (c) => { body += c; });
    req.on('end', () => {
      const p = new URLSearchParams(body);
      const socketId = p.get('socket_id');
      const channel = p.get('channel_name');
      const userId = p.get('user_id');
      this.requests.push({ method: req.method, socket_id: socketId, channel, user_id: userId });
      changed();
      if (req.url.startsWith('/pusher/user-auth')) {
        // User authentication (pusher-js signin()), as the Node library
        // documents it: authenticateUser(socket_id, {id, ...}).
        if (req.method !== 'POST' || !socketId || !userId) {
          res.writeHead(400, { 'content-type': 'text/plain' });
          res.end('expected a POST with socket_id and user_id');
          return;
        }
        const auth = this.good.authenticateUser(socketId, { id: userId, name: `name of ${userId}` });
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify(auth));
        return;
      }
      if (req.method !== 'POST' || !socketId || !channel) {
        res.writeHead(400, { 'content-type': 'text/plain' });
        res.end('expected a POST with socket_id and channel_name');
        return;
      }
      const signer = channel.includes('-forged-') ? this.forger : this.good;
      let auth;
      try {
        if (channel.startsWith('presence-')) {
          auth = signer.authorizeChannel(socketId, channel, {
            user_id: userId,
            user_info: { name: `name of ${userId}` },
          });
        } else {
          auth = signer.authorizeChannel(socketId, channel);
        }
      } catch (e) {
        res.writeHead(500, { 'content-type': 'text/plain' });
        res.end(String(e));
        return;
      }
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(auth));
    });
  }

  close() {
    this.server.close();
  }
}

// ------------------------------------------------------------------ clients

let authServer = null;
async function startAuthServer() {
  authServer = await new AuthServer().listen();
  return authServer;
}

/** A pusher-js client recording everything it sees. */
class Client {
  /**
   * @param name  label for messages
   * @param opts  {user: user_id for channel auth, key: app key (default APP_KEY)}
   */
  constructor(name, opts = {}) {
    this.name = name;
    this.user = opts.user;
    this.states = [];
    this.connErrors = [];
    this.global = [];
    this.channels = {};
    const options = {
      wsHost: cfg.host,
      wsPort: cfg.port,
      wssPort: cfg.port,
      forceTLS: cfg.tls,
      enabledTransports: ['ws'],
      cluster: 'herald',
    };
    if (authServer) {
      options.channelAuthorization = {
        endpoint: authServer.url,
        transport: 'ajax',
        params: { user_id: opts.user || name },
      };
      options.userAuthentication = {
        endpoint: authServer.userUrl,
        transport: 'ajax',
        params: { user_id: opts.user || name },
      };
    }
    this.pusher = new PusherClient(opts.key || cfg.key, options);
    // The constructor already started connecting.
    this.states.push(this.pusher.connection.state);
    this.pusher.connection.bind('state_change', (s) => {
      this.states.push(s.current);
      changed();
    });
    this.pusher.connection.bind('error', (e) => {
      this.connErrors.push(e);
      changed();
    });
    this.pusher.bind_global((event, data) => {
      this.global.push({ event, data });
      changed();
    });
    // Every frame re-checks pending waits (signin and the user's own
    // channel are visible only as pusher-js state).
    this.pusher.connection.bind('message', () => changed());
    this.userEvents = [];
  }

  /**
   * Signs in (pusher-js signin(), through the auth server's user
   * authentication) and waits until pusher-js is subscribed to the user's
   * own channel, `#server-to-user-{id}`; records events sent to the user.
   */
  async signin() {
    this.pusher.user.bind_global((event, data) => {
      this.userEvents.push({ event, data });
      changed();
    });
    this.pusher.signin();
    await until(`${this.name} to sign in and subscribe to its user channel`, () => {
      const ch = this.pusher.user.serverToUserChannel;
      return ch && ch.subscribed;
    });
    return this.pusher.user.user_data;
  }

  /** The next event sent to the signed-in user (pusher-js `user.bind`). */
  async nextUserEvent(event) {
    const taken = this.takenUser || (this.takenUser = new Set());
    const e = await until(`${this.name} to receive user event ${event}`, () =>
      this.userEvents.find((x) => !taken.has(x) && x.event === event));
    taken.add(e);
    return e.data;
  }

  get state() {
    return this.pusher.connection.state;
  }

  get socketId() {
    return this.pusher.connection.socket_id;
  }

  /** Error codes seen: `pusher:error` frames and close codes. */
  errorCodes() {
    const codes = [];
    for (const g of this.global) {
      if (g.event === 'pusher:error' && g.data) codes.push(g.data.code);
    }
    for (const e of this.connErrors) {
      const inner = e && e.error;
      if (inner && inner.data && inner.data.code !== undefined) codes.push(inner.data.code);
      else if (e && e.data && e.data.code !== undefined) codes.push(e.data.code);
    }
    return codes;
  }

  /** `pusher:error` frames received (their data). */
  pusherErrors() {
    return this.global.filter((g) => g.event === 'pusher:error').map((g) => g.data);
  }

  async connected() {
    await until(`${this.name} to connect`, () => {
      if (this.state === 'connected') return true;
      if (this.state === 'failed' || this.state === 'disconnected' || this.state === 'unavailable') {
        throw new Error(`${this.name} could not connect: state ${this.state}, errors ${JSON.stringify(this.connErrors)}`);
      }
      return false;
    });
    if (!/^\d+\.\d+$/.test(this.socketId)) {
      throw new Error(`${this.name}: socket_id ${JSON.stringify(this.socketId)} is not \\d+.\\d+`);
    }
    return this;
  }

  subscribe(name) {
    const ch = new Chan(this, name, this.pusher.subscribe(name));
    this.channels[name] = ch;
    return ch;
  }

  /** Disconnects and waits for pusher-js to report it. */
  async disconnect() {
    this.pusher.disconnect();
    await until(`${this.name} to disconnect`, () => this.state === 'disconnected');
  }
}

/** A subscription, recording its events in order. */
class Chan {
  constructor(client, name, channel) {
    this.client = client;
    this.name = name;
    this.channel = channel;
    this.events = [];
    this.taken = new Set();
    channel.bind_global((event, data) => {
      this.events.push({ event, data });
      changed();
    });
  }

  /** Waits for pusher:subscription_succeeded; returns its data. */
  async subscribed() {
    const e = await until(`${this.client.name} subscription to ${this.name}`, () => {
      const err = this.events.find((x) => x.event === 'pusher:subscription_error');
      if (err) throw new Error(`${this.client.name}: subscription to ${this.name} failed: ${JSON.stringify(err.data)}`);
      return this.events.find((x) => x.event === 'pusher:subscription_succeeded');
    });
    return e.data;
  }

  /** Waits for pusher:subscription_error; returns its data. */
  async refused() {
    const e = await until(`${this.client.name} subscription_error on ${this.name}`, () => {
      if (this.events.find((x) => x.event === 'pusher:subscription_succeeded')) {
        throw new Error(`${this.client.name}: subscription to ${this.name} succeeded but should have been refused`);
      }
      return this.events.find((x) => x.event === 'pusher:subscription_error');
    });
    return e.data;
  }

  /** The next not yet taken `event` (optionally matching `pred(data)`); returns its data. */
  async next(event, pred = () => true) {
    const e = await until(`${this.client.name} to receive ${event} on ${this.name}`, () =>
      this.events.find((x) => !this.taken.has(x) && x.event === event && pred(x.data)));
    this.taken.add(e);
    return e.data;
  }

  count(event, pred = () => true) {
    return this.events.filter((x) => x.event === event && pred(x.data)).length;
  }
}

// ------------------------------------------------------- the server library

/** The Node `pusher` server library pointed at herald (options override). */
function api(over = {}) {
  return new PusherServer(Object.assign({
    appId: cfg.appId,
    key: cfg.key,
    secret: cfg.secret,
    host: cfg.host,
    port: String(cfg.port),
    useTLS: cfg.tls,
    timeout: STEP_MS,
  }, over));
}

/** Runs a request of the server library; returns {status, body} for success and HTTP errors alike. */
async function call(promise) {
  try {
    const res = await promise;
    const text = await res.text();
    let body = text;
    try { body = JSON.parse(text); } catch (_) { /* not JSON */ }
    return { status: res.status, body };
  } catch (e) {
    if (e && typeof e.status === 'number') {
      let body = e.body;
      try { body = JSON.parse(e.body); } catch (_) { /* not JSON */ }
      return { status: e.status, body };
    }
    throw e;
  }
}

// ------------------------------------------------- talking to the driver

let stdinLines = null;
const pendingLines = [];
const lineWaiters = [];
let stdinClosed = false;

function nextStdinLine() {
  if (!stdinLines) {
    stdinLines = readline.createInterface({ input: process.stdin });
    stdinLines.on('line', (l) => {
      if (lineWaiters.length) lineWaiters.shift()(l);
      else pendingLines.push(l);
    });
    stdinLines.on('close', () => {
      stdinClosed = true;
      while (lineWaiters.length) lineWaiters.shift()(null);
    });
  }
  if (pendingLines.length) return Promise.resolve(pendingLines.shift());
  if (stdinClosed) return Promise.resolve(null);
  return new Promise((r) => lineWaiters.push(r));
}

/** Asks the driver: prints `{"barrier": name, ...info}`, returns its JSON answer. */
async function barrier(name, info = {}) {
  step(`barrier ${name}`);
  process.stdout.write(JSON.stringify(Object.assign({ barrier: name }, info)) + '\n');
  const line = await nextStdinLine();
  if (line === null) throw new Error(`stdin closed while waiting for the driver at barrier ${name}`);
  return JSON.parse(line);
}

/** Prints the result line and exits 0. */
function done(result) {
  process.stdout.write(JSON.stringify({ result }) + '\n', () => process.exit(0));
}

/** Runs the script body; any exception fails the script with the current step. */
function run(main) {
  main().then(
    (result) => done(result === undefined ? {} : result),
    (e) => fail(`${currentStep}: ${e && e.stack ? e.stack : JSON.stringify(e)}`),
  );
}

/** A snapshot of a pusher-js presence `members` object. */
function members(m) {
  const list = [];
  m.each((x) => list.push({ id: x.id, info: x.info }));
  list.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  return { count: m.count, me: m.me ? m.me.id : null, ids: list.map((x) => x.id), members: list };
}

/**
 * Opens connections with `make(i)` until the driver says they span every
 * core (barrier `connections`, answered `{"go":true}` or `{"more":true}`).
 * Needs at least `min`; gives up beyond `max`.
 */
async function spreadConnections(make, min = 2, max = 16) {
  const clients = [];
  for (;;) {
    const c = make(clients.length);
    clients.push(c);
    await c.connected();
    if (clients.length < min) continue;
    const answer = await barrier('connections', {
      count: clients.length,
      socket_ids: clients.map((x) => x.socketId),
    });
    if (answer.go) return { clients, perWorker: answer.per_worker };
    if (clients.length >= max) {
      throw new Error(`${max} connections still do not span every core: ${JSON.stringify(answer)}`);
    }
  }
}

module.exports = {
  cfg,
  PusherClient,
  PusherServer,
  Client,
  api,
  call,
  until,
  poll,
  quiet,
  step,
  barrier,
  done,
  run,
  fail,
  members,
  startAuthServer,
  spreadConnections,
  STEP_MS,
};
