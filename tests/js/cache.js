'use strict';
// Cache channels with pusher-js: the first subscriber of an empty cache
// channel gets pusher:cache_miss; a later one gets the last event triggered
// (through the Node `pusher` library), before any live event.
// Prints {"result": {...}} for tests/pusher_clients.rs to check.

const { Client, api, call, step, run } = require('./lib');

run(async () => {
  const out = {};
  step('connect');
  const a = new Client('a');
  await a.connected();

  step('subscribe to an empty cache channel');
  const ac = a.subscribe('cache-scores');
  await ac.subscribed();
  await ac.next('pusher:cache_miss');
  out.miss_at_a = ac.count('pusher:cache_miss');

  step('trigger two events');
  const server = api();
  out.trigger = await call(server.trigger('cache-scores', 'score', { home: 1 }));
  out.live_1 = await ac.next('score');
  await call(server.trigger('cache-scores', 'score', { home: 2 }));
  out.live_2 = await ac.next('score');

  step('a later subscriber');
  const b = new Client('b');
  await b.connected();
  const bc = b.subscribe('cache-scores');
  await bc.subscribed();
  out.cached_at_b = await bc.next('score');
  await call(server.trigger('cache-scores', 'score', { home: 3 }));
  out.live_at_b = await bc.next('score');
  out.scores_at_b = bc.count('score');
  out.miss_at_b = bc.count('pusher:cache_miss');

  await Promise.all([a.disconnect(), b.disconnect()]);
  return out;
});
