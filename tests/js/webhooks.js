'use strict';
// Activity that herald reports through webhooks, made with pusher-js: two
// users (alice, bob) on connections spanning every core subscribe to a
// public, a private and a presence channel, alice sends a client event on
// the private and on the presence channel, then everyone disconnects.
// tests/pusher_clients.rs checks what its webhook receiver got.
// Prints {"result": {...}}.

const { Client, step, run, startAuthServer, spreadConnections } = require('./lib');

const CHANNELS = ['wh-public', 'private-wh', 'presence-wh'];

run(async () => {
  const out = {};
  const auth = await startAuthServer();

  step('connections spanning every core');
  const spread = await spreadConnections((i) => {
    const user = i % 2 === 0 ? 'alice' : 'bob';
    return new Client(`${user}-${i}`, { user });
  }, 2);
  const clients = spread.clients;
  out.per_worker = spread.perWorker;
  out.connections = clients.map((c) => ({ user: c.user, socket_id: c.socketId }));

  step('everyone subscribes to every channel');
  const subs = clients.map((c) => CHANNELS.map((name) => c.subscribe(name)));
  await Promise.all(subs.flat().map((s) => s.subscribed()));

  step('alice sends client events');
  const [alice, bob] = [0, 1];
  subs[alice][1].channel.trigger('client-note', { text: 'on private' });
  await subs[bob][1].next('client-note');
  subs[alice][2].channel.trigger('client-note', { text: 'on presence' });
  await subs[bob][2].next('client-note');
  out.client_event_sender = { user: clients[alice].user, socket_id: clients[alice].socketId };

  step('everyone disconnects');
  for (const c of clients) await c.disconnect();
  auth.close();
  return out;
});
