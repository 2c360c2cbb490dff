'use strict';
// pusher-js through a herald restart (SIGUSR2): connected and subscribed,
// then the driver restarts the server; the old process closes the
// connection with 4200 and pusher-js reconnects at once to the new one.
// Prints how long it was away and what it saw.

const { Client, step, barrier, until, run } = require('./lib');

run(async () => {
  step('connect and subscribe');
  const c = new Client('c');
  await c.connected();
  const ch = c.subscribe('news');
  await ch.subscribed();
  const seen = c.states.length;
  await barrier('restart');
  step('wait for the close');
  const closed = await until('the connection to leave connected', () =>
    c.states.slice(seen).find((s) => s !== 'connected') && Date.now());
  step('wait for the reconnection');
  await until('pusher-js to connect again', () =>
    c.states.slice(seen).lastIndexOf('connected') > c.states.slice(seen).findIndex((s) => s !== 'connected') &&
    c.state === 'connected');
  const backMs = Date.now() - closed;
  return {
    back_ms: backMs,
    states: c.states.slice(seen),
  };
});
