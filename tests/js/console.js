'use strict';
// The debug console (/console) in a real browser: Debian's Chromium,
// headless, driven by puppeteer-core (tests/console.rs starts herald and
// the clients). The page must show the node's connections and channels,
// the events the driver causes while it watches, deliveries per second,
// and publish from its form; a screenshot is kept (SCREENSHOT).

const { step, barrier, run } = require('./lib');
const puppeteer = require('puppeteer-core');

const WAIT_MS = 15000;

run(async () => {
  step('start chromium');
  const browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  try {
    const page = await browser.newPage();
    await page.setViewport({ width: 1280, height: 900 });
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    const token = encodeURIComponent(process.env.ADMIN_TOKEN);
    step('open the console');
    const res = await page.goto(`http://${process.env.HERALD_ADDR}/console?token=${token}`);
    if (res.status() !== 200) throw new Error(`/console answered ${res.status()}`);
    const text = (sel) => page.$eval(sel, (el) => el.textContent);
    const waitFor = (what, fn, ...args) =>
      page.waitForFunction(fn, { timeout: WAIT_MS, polling: 100 }, ...args).catch((e) => {
        throw new Error(`waiting for ${what}: ${e.message}`);
      });
    await waitFor('the first state', () => /^\d+$/.test(document.getElementById('connections').textContent));

    // The driver subscribes clients and publishes while the page watches.
    await barrier('watching');
    step('see the channel, its subscribers and the events');
    await waitFor('channel room with 3 subscribers', () =>
      [...document.querySelectorAll('#channels tbody tr')].some((tr) =>
        tr.cells[1].textContent === 'room' && tr.cells[2].textContent === '3'));
    await waitFor('the subscribe events', () =>
      document.querySelectorAll('#events li[data-kind="subscribe"]').length >= 3);
    await waitFor('the publish event', () =>
      [...document.querySelectorAll('#events li[data-kind="publish"]')].some((li) => li.textContent.includes('room')));
    await waitFor('a delivery rate', () => /^\d+$/.test(document.getElementById('delivery-rate').textContent));
    const connections = Number(await text('#connections'));

    step('filter the events');
    await page.type('#filter-channel', 'no-such-channel');
    await waitFor('an empty filtered list', () => document.querySelectorAll('#events li').length === 0);
    await page.$eval('#filter-channel', (el) => { el.value = ''; el.dispatchEvent(new Event('input')); });
    await waitFor('the list back', () => document.querySelectorAll('#events li').length > 0);

    step('publish from the form');
    await page.type('#publish-channel', 'room');
    await page.$eval('#publish-data', (el) => { el.value = '"from the browser"'; });
    await page.click('#publish-form button');
    await waitFor('the publish answer', () => /^20[02] /.test(document.getElementById('publish-result').textContent));
    const answer = await text('#publish-result');

    step('screenshot');
    if (process.env.SCREENSHOT) await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
    const events = await page.$$eval('#events li', (lis) => lis.map((li) => li.dataset.kind));
    if (errors.length) throw new Error(`errors in the page: ${errors.join('; ')}`);
    return { connections, answer, kinds: [...new Set(events)].sort() };
  } finally {
    await browser.close();
  }
});
