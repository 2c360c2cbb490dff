'use strict';
// Presence with pusher-js across cores: users join presence-room one by one
// on connections that (the driver checks) span every core; each join is a
// member_added at every earlier member and the joiner's subscription lists
// them all. A second connection of a user is no new member; client events
// carry the sender's user_id (metadata.user_id) and are not echoed; the
// users / channels queries; leaving (disconnect, unsubscribe) and
// terminateUserConnections are member_removed at the others.
// Prints {"result": {...}} for tests/pusher_clients.rs to check.

const {
  Client, api, call, until, poll, step, run, startAuthServer, members, spreadConnections,
} = require('./lib');

const ROOM = 'presence-room';

run(async () => {
  const out = {};
  await startAuthServer();
  const server = api();

  step('open connections until they span every core');
  const spread = await spreadConnections((i) => new Client(`u${i}`, { user: `u${i}` }), 4);
  const clients = spread.clients;
  out.per_worker = spread.perWorker;
  out.users = clients.map((c) => c.user);

  step('users join one by one');
  const joined = [];
  out.joins = [];
  for (const c of clients) {
    const ch = c.subscribe(ROOM);
    const m = await ch.subscribed();
    const snapshot = members(m);
    // Every earlier member hears about the newcomer.
    const heard = [];
    for (const j of joined) {
      heard.push(await j.ch.next('pusher:member_added', (d) => d && d.id === c.user));
    }
    joined.push({ c, ch });
    out.joins.push({ user: c.user, members: snapshot, member_added_at_others: heard });
  }
  const n = joined.length;

  step('a second connection of u0');
  const u0b = new Client('u0b', { user: 'u0' });
  await u0b.connected();
  const u0bCh = u0b.subscribe(ROOM);
  out.second_connection_members = members(await u0bCh.subscribed());
  await call(server.trigger(ROOM, 'marker-1', {}));
  for (const j of joined) await j.ch.next('marker-1');
  await u0bCh.next('marker-1');
  out.member_added_for_second_connection = joined.map((j) => j.ch.count('pusher:member_added', (d) => d && d.id === 'u0'));

  step('queries');
  out.users_query = await call(server.get({ path: `/channels/${ROOM}/users` }));
  out.channels_query = await call(server.get({ path: '/channels', params: { filter_by_prefix: 'presence-', info: 'user_count' } }));
  out.channel_query = await call(server.get({ path: `/channels/${ROOM}`, params: { info: 'user_count,subscription_count' } }));

  step('client event from u1');
  const sender = joined[1];
  const receivers = joined.filter((j) => j !== sender).map((j) => j.ch).concat([u0bCh]);
  const seen = new Map();
  for (const r of receivers) {
    seen.set(r, []);
    r.channel.bind('client-hello', (data, metadata) => seen.get(r).push({ data, metadata }));
  }
  out.client_event_sent = sender.ch.channel.trigger('client-hello', { from: 'u1' });
  out.client_event_at_others = [];
  for (const r of receivers) {
    await r.next('client-hello');
    out.client_event_at_others.push({ at: r.client.name, ...seen.get(r)[0] });
  }
  await call(server.trigger(ROOM, 'marker-2', {}));
  await sender.ch.next('marker-2');
  out.client_event_echoed_to_sender = sender.ch.count('client-hello');

  step('u0 closes its first connection: still present through u0b');
  await joined[0].c.disconnect();
  await call(server.trigger(ROOM, 'marker-3', {}));
  for (const j of joined.slice(1)) await j.ch.next('marker-3');
  out.member_removed_u0_after_first_close = joined.slice(1).map((j) => j.ch.count('pusher:member_removed', (d) => d && d.id === 'u0'));

  step('u0 closes its last connection');
  await u0b.disconnect();
  out.member_removed_u0 = [];
  for (const j of joined.slice(1)) out.member_removed_u0.push(await j.ch.next('pusher:member_removed', (d) => d && d.id === 'u0'));

  step('u1 unsubscribes');
  joined[1].c.pusher.unsubscribe(ROOM);
  out.member_removed_u1 = [];
  for (const j of joined.slice(2)) out.member_removed_u1.push(await j.ch.next('pusher:member_removed', (d) => d && d.id === 'u1'));

  step('terminateUserConnections(u2)');
  const victim = joined[2].c;
  out.terminate = await call(server.terminateUserConnections('u2'));
  out.terminate_error_codes = await until('u2 to be told 4009', () => {
    const codes = victim.errorCodes();
    return codes.includes(4009) && codes;
  });
  await until('u2 to be disconnected', () => victim.state === 'disconnected' || victim.state === 'failed');
  out.terminated_states = [...victim.states];
  out.member_removed_u2 = [];
  for (const j of joined.slice(3)) out.member_removed_u2.push(await j.ch.next('pusher:member_removed', (d) => d && d.id === 'u2'));

  step('users left');
  out.remaining = joined.slice(3).map((j) => j.c.user);
  out.users_query_after = await poll('users query to list only the remaining users', async () => {
    const r = await call(server.get({ path: `/channels/${ROOM}/users` }));
    const ids = r.body && r.body.users ? r.body.users.map((u) => u.id).sort() : null;
    return { ok: ids && JSON.stringify(ids) === JSON.stringify([...out.remaining].sort()), value: r };
  });
  out.member_count = n;

  for (const j of joined.slice(3)) await j.c.disconnect();
  await joined[1].c.disconnect();
  return out;
});
