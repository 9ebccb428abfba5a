// Open the loop dashboard (a Prometheus console page) in headless Debian chromium, wait until every panel
// has plotted data (or the time is up), save a screenshot; optionally screenshot a second page (Feast's UI).
// Env: DASHBOARD_URL, SCREENSHOT, TIMEOUT_S (default 180), EXTRA_URL + EXTRA_SCREENSHOT + EXTRA_TEXT (optional:
// the page must show this text). Prints one JSON line: {"panels": [{title, series, points, newest, error}], ...}.
// Exit 0 when the browser did its part; the Python test judges the panels.
import { SCREENSHOT_TIMEOUT_MS, env, run } from './chromium.mjs';

const url = env('DASHBOARD_URL');
const screenshot = env('SCREENSHOT');
const deadline = Date.now() + 1000 * Number(env('TIMEOUT_S', '180'));

const result = { panels: [], refreshed: 0, screenshot, requests_off_machine: [] };
const panelState = () => Array.from(document.querySelectorAll('section.panel')).map((p) => ({
  title: p.dataset.title,
  series: Number(p.dataset.series || 0),
  points: Number(p.dataset.points || 0),
  newest: Number(p.dataset.newest || 0),
  error: p.dataset.error || '',
  legend: p.querySelector('.legend').innerText,
}));
await run(result, async (browser) => {
  const page = await browser.newPage({ viewport: { width: 1500, height: 900 } });
  // nothing outside this machine may be needed (no CDN): record any request that tries
  page.on('request', (request) => {
    const { protocol, hostname } = new URL(request.url());
    const network = ['http:', 'https:', 'ws:', 'wss:'].includes(protocol); // data: and blob: stay in the page
    if (network && !['127.0.0.1', 'localhost'].includes(hostname)) result.requests_off_machine.push(request.url());
  });
  page.on('console', (message) => console.error(`page console: ${message.text()}`));
  await page.goto(url);
  await page.waitForSelector('section.panel');
  while (Date.now() < deadline) {
    result.panels = await page.evaluate(panelState);
    result.refreshed = Number(await page.evaluate(() => document.body.dataset.refreshed || 0));
    const empty = result.panels.filter((p) => p.points === 0).map((p) => p.title);
    console.error(`refresh ${result.refreshed}: ${empty.length ? 'no data yet in ' + empty.join(', ') : 'every panel has data'}`);
    if (result.panels.length && !empty.length) {
      // one more refresh, so the newest points are on the picture too
      const seen = result.refreshed;
      await page.waitForFunction((n) => Number(document.body.dataset.refreshed || 0) > n, seen, { timeout: 60000 });
      result.panels = await page.evaluate(panelState);
      break;
    }
    await page.waitForTimeout(2000);
  }
  await page.screenshot({ path: screenshot, fullPage: true, timeout: SCREENSHOT_TIMEOUT_MS });
  if (process.env.EXTRA_URL) {
    const extra = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    await extra.goto(process.env.EXTRA_URL);
    await extra.getByText(env('EXTRA_TEXT')).first().waitFor({ timeout: 60000 });
    await extra.waitForTimeout(1000);
    await extra.screenshot({ path: env('EXTRA_SCREENSHOT'), fullPage: true, timeout: SCREENSHOT_TIMEOUT_MS });
    result.extra = { url: process.env.EXTRA_URL, screenshot: process.env.EXTRA_SCREENSHOT };
  }
}, (r) => !r.error);
