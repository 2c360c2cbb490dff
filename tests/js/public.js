'use strict';
// Public channels with pusher-js, events through the Node `pusher` library:
// trigger to one and several channels, triggerBatch, socket_id exclusion,
// and the channels / channel queries (before and after an unsubscribe).
// Prints {"result": {...}} for tests/pusher_clients.rs to check.

const { Client, api, call, poll, step, run } = require('./lib');

run(async () => {
  const out = {};
  step('connect two clients');
  const a = new Client('a');
  const b = new Client('b');
  await Promise.all([a.connected(), b.connected()]);
  out.socket_ids = [a.socketId, b.socketId];
  // pusher-js takes min(its own 120 s, the server's activity_timeout).
  out.activity_timeout_ms = a.pusher.connection.activityTimeout;

  step('subscribe');
  const an = a.subscribe('news');
  const ao = a.subscribe('other-news');
  const bn = b.subscribe('news');
  await Promise.all([an.subscribed(), ao.subscribed(), bn.subscribed()]);

  const server = api();

  step('trigger to one channel');
  out.trigger = await call(server.trigger('news', 'greeting', { hello: 'world' }));
  out.greeting = [await an.next('greeting'), await bn.next('greeting')];

  step('trigger to two channels');
  out.trigger_multi = await call(server.trigger(['news', 'other-news'], 'multi', 'plain text'));
  out.multi = {
    a_news: await an.next('multi'),
    a_other: await ao.next('multi'),
    b_news: await bn.next('multi'),
  };

  step('trigger excluding a socket_id');
  out.trigger_excluding = await call(server.trigger('news', 'not-for-a', { n: 1 }, { socket_id: a.socketId }));
  out.excluded_event_at_b = await bn.next('not-for-a');
  // A later event on the same channel reaches a: had the excluded one been
  // sent to a, it would be there by now.
  await call(server.trigger('news', 'marker-1', {}));
  await an.next('marker-1');
  await bn.next('marker-1');
  out.excluded_event_count_at_a = an.count('not-for-a');

  step('triggerBatch');
  out.batch = await call(server.triggerBatch([
    { channel: 'news', name: 'batch-1', data: JSON.stringify({ i: 1 }) },
    { channel: 'other-news', name: 'batch-2', data: JSON.stringify({ i: 2 }) },
  ]));
  out.batch_events = {
    a_news: await an.next('batch-1'),
    a_other: await ao.next('batch-2'),
    b_news: await bn.next('batch-1'),
  };

  step('queries');
  out.channels = await call(server.get({ path: '/channels' }));
  out.channels_other = await call(server.get({ path: '/channels', params: { filter_by_prefix: 'other-' } }));
  out.channel_news = await call(server.get({ path: '/channels/news', params: { info: 'subscription_count' } }));
  out.channel_nobody = await call(server.get({ path: '/channels/nobody-here', params: { info: 'subscription_count' } }));

  step('b unsubscribes from news');
  b.pusher.unsubscribe('news');
  out.channel_news_after_unsubscribe = await poll('subscription_count of news to drop to 1', async () => {
    const r = await call(server.get({ path: '/channels/news', params: { info: 'subscription_count' } }));
    return { ok: r.body && r.body.subscription_count === 1, value: r };
  });
  await call(server.trigger('news', 'after-unsubscribe', {}));
  await an.next('after-unsubscribe');
  // pusher-js drops events of channels it left, so count what reached b at all.
  out.after_unsubscribe_count_at_b = b.global.filter((g) => g.event === 'after-unsubscribe').length;

  step('everyone leaves');
  await Promise.all([a.disconnect(), b.disconnect()]);
  out.channels_when_empty = await poll('no channels once everyone left', async () => {
    const r = await call(server.get({ path: '/channels' }));
    return { ok: r.body && r.body.channels && Object.keys(r.body.channels).length === 0, value: r };
  });
  return out;
});
