'use strict';
// Error paths as the real libraries see them: pusher-js with an unknown app
// key (error 4001, gives up without retrying) and with a disabled app
// (4003); the Node `pusher` library with a wrong secret (401), a clock more
// than 600 s off (401), an unknown app id (404), next to requests that work.
// Env: DISABLED_APP_KEY (optional).
// Prints {"result": {...}} for tests/pusher_clients.rs to check.

const { Client, api, call, until, quiet, step, run } = require('./lib');

/** How long a refused client is watched for a retry (pusher-js retries within 1 s when it does). */
const NO_RETRY_WINDOW_MS = 2000;

async function refusedClient(name, key) {
  const c = new Client(name, { key });
  const codes = await until(`${name} to get an error code`, () => {
    const codes = c.errorCodes();
    return codes.length > 0 && codes;
  });
  await until(`${name} to stop (disconnected or failed)`, () => c.state === 'disconnected' || c.state === 'failed');
  const stoppedAt = c.states.length;
  await quiet(NO_RETRY_WINDOW_MS);
  return {
    error_codes: codes,
    errors: c.connErrors,
    states: [...c.states],
    states_after_stop: c.states.slice(stoppedAt),
    state: c.state,
    socket_id: c.socketId || null,
  };
}

run(async () => {
  const out = {};

  step('unknown app key');
  const disabledKey = process.env.DISABLED_APP_KEY;
  const [bad, disabled] = await Promise.all([
    refusedClient('bad-key', 'no-such-key'),
    disabledKey ? refusedClient('disabled', disabledKey) : Promise.resolve(null),
  ]);
  out.bad_key = bad;
  out.disabled_app = disabled;

  step('HTTP API');
  const good = api();
  out.good_trigger = await call(good.trigger('some-channel', 'ev', { ok: true }));
  out.good_get = await call(good.get({ path: '/channels' }));
  const wrong = api({ secret: 'not-the-secret' });
  out.bad_secret_trigger = await call(wrong.trigger('some-channel', 'ev', { ok: false }));
  out.bad_secret_get = await call(wrong.get({ path: '/channels' }));
  out.old_timestamp = await call(withOffset(-700, () => good.trigger('some-channel', 'ev', {})));
  out.old_timestamp_get = await call(withOffset(-700, () => good.get({ path: '/channels' })));
  out.future_timestamp = await call(withOffset(700, () => good.trigger('some-channel', 'ev', {})));
  out.slightly_old_timestamp = await call(withOffset(-300, () => good.trigger('some-channel', 'ev', {})));
  out.unknown_app = await call(api({ appId: 'no-such-app' }).trigger('some-channel', 'ev', {}));
  out.unknown_app_get = await call(api({ appId: 'no-such-app' }).get({ path: '/channels' }));
  return out;
});

/** Starts a library request with the clock `sec` seconds off (the library stamps auth_timestamp synchronously). */
function withOffset(sec, start) {
  const realNow = Date.now;
  Date.now = () => realNow.call(Date) + sec * 1000;
  try {
    return start();
  } finally {
    Date.now = realNow;
  }
}
