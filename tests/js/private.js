'use strict';
// Private channels with pusher-js and an auth endpoint written with the Node
// `pusher` library (authorizeChannel): a good signature subscribes, a forged
// one gets pusher:subscription_error and the connection stays usable; client
// events reach the others but not the sender; a burst of client events over
// the app's limit gets pusher:error 4301.
// Prints {"result": {...}} for tests/pusher_clients.rs to check.

const { Client, api, call, until, step, run, startAuthServer, cfg } = require('./lib');

run(async () => {
  const out = {};
  const auth = await startAuthServer();
  const server = api();

  step('connect');
  const a = new Client('a', { user: 'alice' });
  const b = new Client('b', { user: 'bob' });
  await Promise.all([a.connected(), b.connected()]);

  step('subscribe to private-chat with a good authorization');
  const ap = a.subscribe('private-chat');
  const bp = b.subscribe('private-chat');
  await Promise.all([ap.subscribed(), bp.subscribed()]);
  out.auth_requests = auth.requests.map((r) => ({ channel: r.channel, socket_id: r.socket_id }));
  out.socket_ids = { a: a.socketId, b: b.socketId };

  step('server event on the private channel');
  out.trigger = await call(server.trigger('private-chat', 'server-news', { n: 1 }));
  out.server_event = [await ap.next('server-news'), await bp.next('server-news')];

  step('client event from a');
  const seenByB = [];
  bp.channel.bind('client-typing', (data, metadata) => seenByB.push({ data, metadata }));
  out.client_event_sent = ap.channel.trigger('client-typing', { who: 'alice' });
  out.client_event_at_b = await bp.next('client-typing');
  out.client_event_metadata_at_b = seenByB[0] ? seenByB[0].metadata : null;
  await call(server.trigger('private-chat', 'marker-1', {}));
  await ap.next('marker-1');
  out.client_event_echoed_to_a = ap.count('client-typing');

  step('forged authorization');
  const forged = a.subscribe('private-forged-1');
  out.forged_error = await forged.refused();
  out.state_after_forged = a.state;

  step('raw subscribes with bad auth values');
  const raw = [
    ['private-raw-empty', ''],
    ['private-raw-nocolon', 'not-a-signature'],
    ['private-raw-zeros', `${cfg.key}:${'0'.repeat(64)}`],
    ['private-raw-otherkey', `other-key:${'0'.repeat(64)}`],
  ];
  for (const [channel, value] of raw) {
    a.pusher.send_event('pusher:subscribe', { channel, auth: value });
  }
  // Not pusher-js channels, so the errors show on the global emitter only.
  const rawErrors = await until('subscription_error for each raw subscribe', () => {
    const errs = a.global.filter((g) => g.event === 'pusher:subscription_error');
    return errs.length >= raw.length && errs;
  });
  out.raw_errors = rawErrors.map((g) => g.data);
  out.errors_after_raw = a.pusherErrors();

  step('the connection is still usable');
  const after = a.subscribe('private-after');
  await after.subscribed();
  out.state_after_raw = a.state;
  out.states_a = [...a.states];

  step('client event burst over the limit');
  const c = new Client('c', { user: 'carol' });
  await c.connected();
  const cp = c.subscribe('private-chat');
  await cp.subscribed();
  const burst = 25;
  for (let i = 0; i < burst; i++) cp.channel.trigger('client-burst', { i });
  out.burst_sent = burst;
  out.rate_error_codes = await until('c to get error 4301', () => {
    const codes = c.errorCodes();
    return codes.includes(4301) && codes;
  });
  out.rate_pusher_errors = c.pusherErrors();
  // Everything of c's burst that herald accepted was fanned out before the
  // error; a later server event on the channel comes after it.
  await call(server.trigger('private-chat', 'marker-2', {}));
  await bp.next('marker-2');
  out.burst_received_by_b = bp.count('client-burst');
  out.states_c = [...c.states];

  await Promise.all([a.disconnect(), b.disconnect(), c.disconnect()]);
  auth.close();
  return out;
});
