// Open pages in headless Debian chromium, wait on each until every text it must show is on it (or the time
// is up), then save its screenshot. Env: PAGES, a JSON list of {"url", "texts": [...], "screenshot"};
// TIMEOUT_S per page (default 90). Prints one JSON line: {"pages": [{url, found, missing, screenshot}],
// "requests_off_machine": [...]}; exit 0 when every text was found on its page.
import { SCREENSHOT_TIMEOUT_MS, env, run } from './chromium.mjs';

const pages = JSON.parse(env('PAGES'));
const timeoutMs = 1000 * Number(env('TIMEOUT_S', '90'));

const result = { pages: [], requests_off_machine: [] };
await run(result, async (browser) => {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.setDefaultNavigationTimeout(timeoutMs);
  page.on('request', (request) => {
    const { protocol, hostname } = new URL(request.url());
    const network = ['http:', 'https:', 'ws:', 'wss:'].includes(protocol);
    if (network && !['127.0.0.1', 'localhost'].includes(hostname)) result.requests_off_machine.push(request.url());
  });
  for (const { url, texts, screenshot, height } of pages) {
    const seen = { url, found: [], missing: [], screenshot };
    result.pages.push(seen);
    await page.setViewportSize({ width: 1400, height: height ?? 900 });
    await page.goto(url);
    const deadline = Date.now() + timeoutMs;
    for (const text of texts) {
      // the page renders in steps (a single-page app fetching its data): wait per text, within one budget
      // the first visible match: a single-page app keeps hidden copies of some texts (menus, tooltips)
      const shown = await page.getByText(text, { exact: false }).filter({ visible: true }).first()
        .waitFor({ state: 'visible', timeout: Math.max(1000, deadline - Date.now()) })
        .then(() => true, () => false);
      (shown ? seen.found : seen.missing).push(text);
    }
    console.error(`${url}: found ${seen.found.length} of ${texts.length}${seen.missing.length ? ', missing ' + JSON.stringify(seen.missing) : ''}`);
    await page.waitForTimeout(1000); // charts and tables settle before the picture
    await page.screenshot({ path: screenshot, fullPage: true, timeout: SCREENSHOT_TIMEOUT_MS });
  }
}, (r) => r.pages.length > 0 && r.pages.every((p) => p.missing.length === 0));
