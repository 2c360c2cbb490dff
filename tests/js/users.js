'use strict';
// Server-to-user events, as Pusher documents them: pusher-js signin() (the
// auth server signs the user with the Node library's authenticateUser),
// then the Node library's sendToUser reaches every connection signed in as
// that user, on every core, through pusher-js's user.bind(); no one else
// gets it, and a connection not signed in as the user cannot subscribe to
// its channel.
// Prints {"result": {...}} for tests/pusher_clients.rs to check.

const { Client, api, call, until, step, run, startAuthServer, spreadConnections } = require('./lib');

run(async () => {
  const out = {};
  await startAuthServer();
  const server = api();

  step('alice connects from several places, spread over every core');
  const spread = await spreadConnections((i) => new Client(`alice${i}`, { user: 'alice' }), 2);
  const alice = spread.clients;
  out.per_worker = spread.perWorker;
  const bob = new Client('bob', { user: 'bob' });
  const mallory = new Client('mallory', { user: 'mallory' });
  await Promise.all([bob.connected(), mallory.connected()]);

  step('signin');
  out.user_data = [];
  for (const c of [...alice, bob]) out.user_data.push(await c.signin());

  step('sendToUser alice');
  out.send_alice = await call(server.sendToUser('alice', 'greeting', { text: 'hi alice' }));
  out.alice_got = [];
  for (const c of alice) out.alice_got.push(await c.nextUserEvent('greeting'));

  step('sendToUser bob, then a marker for alice');
  out.send_bob = await call(server.sendToUser('bob', 'greeting', { text: 'hi bob' }));
  out.bob_got = await bob.nextUserEvent('greeting');
  await call(server.sendToUser('alice', 'marker', {}));
  for (const c of alice) await c.nextUserEvent('marker');
  // Frames reach each connection in order: bob's greeting would have
  // arrived at alice's connections before the marker.
  out.alice_greetings = alice.map((c) => c.userEvents.filter((e) => e.event === 'greeting').length);
  out.bob_greetings = bob.userEvents.filter((e) => e.event === 'greeting').length;

  step('mallory, not signed in, asks for alice\'s channel');
  mallory.pusher.send_event('pusher:subscribe', { channel: '#server-to-user-alice', auth: '' });
  const refused = await until('subscription_error for #server-to-user-alice', () =>
    mallory.global.find((g) => g.event === 'pusher:subscription_error'));
  out.mallory_refused = refused.data;
  await call(server.sendToUser('alice', 'after-mallory', {}));
  for (const c of alice) await c.nextUserEvent('after-mallory');
  out.mallory_user_events = mallory.global.filter((g) => g.event === 'after-mallory' || g.event === 'greeting').length;

  step('user channels are not app channels');
  out.channels = await call(server.get({ path: '/channels' }));
  return out;
});
