'use strict';
// Checks webhook requests herald sent with the Node `pusher` library's own
// verifier (pusher.webhook(request).isValid()), as an app's webhook endpoint
// would. Reads a JSON array of {headers, body} (header names in lower case,
// body as received) on stdin; prints {"result": [{valid, valid_with_wrong_secret, events, time_ms}, ...]}.

const { api, run, step } = require('./lib');

function readStdin() {
  return new Promise((resolve, reject) => {
    let s = '';
    process.stdin.setEncoding('utf8');
    process.stdin.on('data', (c) => { s += c; });
    process.stdin.on('end', () => resolve(s));
    process.stdin.on('error', reject);
  });
}

run(async () => {
  step('read the requests');
  const requests = JSON.parse(await readStdin());
  const right = api();
  const wrong = api({ secret: 'not-the-secret' });
  return requests.map((r) => {
    const req = { headers: r.headers, rawBody: r.body };
    const hook = right.webhook(req);
    const valid = hook.isValid();
    return {
      valid,
      valid_with_wrong_secret: wrong.webhook(req).isValid(),
      events: valid ? hook.getEvents() : null,
      time_ms: valid ? hook.getTime().getTime() : null,
    };
  });
});
