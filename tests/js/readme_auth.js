'use strict';
// Drives the README's auth endpoint example (tests/readme_examples_run.rs
// starts it at AUTH_BASE) with pusher-js: a private channel, a presence
// channel and signin() must all be authorized by it.
// Prints {"result": {...}}.

const { PusherClient, cfg, poll, step, run } = require('./lib');

/** Polls a synchronous condition (pusher-js state) until it holds. */
const until = (what, pred) => poll(what, async () => {
  const v = pred();
  return { ok: !!v, value: v };
});

run(async () => {
  const base = process.env.AUTH_BASE;
  if (!base) throw new Error('AUTH_BASE is not set');
  const seen = [];
  const pusher = new PusherClient(cfg.key, {
    wsHost: cfg.host, wsPort: cfg.port, forceTLS: false, enabledTransports: ['ws'],
    cluster: 'local',
    channelAuthorization: { endpoint: `${base}/pusher/auth`, transport: 'ajax' },
    userAuthentication: { endpoint: `${base}/pusher/user-auth`, transport: 'ajax' },
  });
  pusher.connection.bind('message', (m) => { seen.push(m); });
  const succeeded = (ch) => until(`subscription to ${ch.name}`, () => {
    if (seen.find((m) => m.event === 'pusher:subscription_error' && m.channel === ch.name)) {
      throw new Error(`subscription to ${ch.name} refused`);
    }
    return ch.subscribed;
  });
  step('private channel');
  const priv = pusher.subscribe('private-readme');
  step('presence channel');
  const pres = pusher.subscribe('presence-readme');
  step('signin');
  pusher.signin();
  await until('connected', () => pusher.connection.state === 'connected');
  await Promise.all([succeeded(priv), succeeded(pres)]);
  await until('signin and the user channel', () => {
    const ch = pusher.user.serverToUserChannel;
    return ch && ch.subscribed;
  });
  const out = {
    private: priv.subscribed,
    presence_me: pres.members.me,
    user: pusher.user.user_data,
  };
  pusher.disconnect();
  return out;
});
