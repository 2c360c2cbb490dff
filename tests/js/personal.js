'use strict';
// Personal channels and messages for offline users (README "Personal
// channels"), with the real libraries: the Node `pusher` library's signed
// post() manages alice's durable subscriptions (POST /apps/{id}/subscribe),
// its trigger() publishes while she is offline, then pusher-js signs in
// and subscribes to personal-alice: what she missed arrives first, in
// order, then what is published live, at her global bindings (events
// keep their channel, as in Pushi). pusher-js's WebSocket answers the
// server's acknowledging pings by itself: after she reconnects, nothing
// comes twice.
// Prints {"result": {...}} for tests/pusher_clients.rs to check.

const { Client, api, call, until, step, run, startAuthServer } = require('./lib');

/** The `note` events a client received at its global binding, in order. */
function notes(c) {
  return c.global.filter((g) => g.event === 'note').map((g) => g.data.n);
}

/**
 * Two round trips through the server (subscriptions to fresh channels):
 * the pongs the WebSocket sent for the pings read before each are then
 * processed, so what was read is acknowledged.
 */
async function settle(c, tag) {
  for (const i of [1, 2]) await c.subscribe(`sync-${tag}-${i}`).subscribed();
}

run(async () => {
  const out = {};
  await startAuthServer();
  const server = api();

  step('alice subscribes to news and private-alerts durably, while offline');
  out.sub_news = await call(server.post({ path: '/subscribe', body: { user_id: 'alice', channel: 'news' } }));
  out.sub_alerts = await call(server.post({ path: '/subscribe', body: { user_id: 'alice', channel: 'private-alerts' } }));
  for (const n of [1, 2, 3]) await call(server.trigger('news', 'note', { n: `news-${n}` }));
  await call(server.trigger('private-alerts', 'note', { n: 'alert-1' }));
  await call(server.trigger('sports', 'note', { n: 'sports-1' }));

  step('alice signs in and subscribes to personal-alice');
  const alice = new Client('alice', { user: 'alice' });
  await alice.connected();
  await alice.signin();
  const personal = alice.subscribe('personal-alice');
  await personal.subscribed();
  await until('alice to receive the 4 notes she missed', () => notes(alice).length >= 4);

  step('live');
  await call(server.trigger('news', 'note', { n: 'news-4' }));
  await call(server.trigger('sports', 'note', { n: 'sports-2' }));
  await until('alice to receive news-4', () => notes(alice).includes('news-4'));
  await settle(alice, 'a');
  out.first = notes(alice);
  await alice.disconnect();

  step('offline again, then back');
  await call(server.trigger('news', 'note', { n: 'news-5' }));
  const again = new Client('alice-again', { user: 'alice' });
  await again.connected();
  await again.signin();
  await again.subscribe('personal-alice').subscribed();
  await until('alice to receive news-5', () => notes(again).includes('news-5'));
  await settle(again, 'b');
  out.second = notes(again);

  step('bob, signed in as bob, may not subscribe to personal-alice');
  const bob = new Client('bob', { user: 'bob' });
  await bob.connected();
  await bob.signin();
  out.bob_refused = await bob.subscribe('personal-alice').refused();

  step('unsubscribe');
  out.unsub = await call(server.post({ path: '/unsubscribe', body: { user_id: 'alice', channel: 'news' } }));
  await call(server.trigger('news', 'note', { n: 'news-6' }));
  await call(server.trigger('private-alerts', 'note', { n: 'alert-2' }));
  await until('alice to receive alert-2', () => notes(again).includes('alert-2'));
  await settle(again, 'c');
  out.after_unsubscribe = notes(again);
  return out;
});
