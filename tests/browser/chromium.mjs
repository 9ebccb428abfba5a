// What every browser test script shares: its environment variables, Debian's chromium started headless
// (never a downloaded browser: playwright-core ships none), and the one JSON line it ends with.
import { chromium } from 'playwright-core';

export const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) { console.error(`missing environment variable ${name}`); process.exit(2); }
  return value;
};

// a picture of a big page on a loaded machine takes longer than playwright's default 30 s
export const SCREENSHOT_TIMEOUT_MS = 120000;

export const launch = () => chromium.launch({
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--no-first-run'],
});

// Run `body(browser)`, which fills `result`; an exception is recorded in result.error. Prints the result
// as one JSON line and exits 0 when `ok(result)` holds.
export async function run(result, body, ok) {
  const browser = await launch();
  try {
    await body(browser);
  } catch (error) {
    console.error(`browser test error: ${error}`);
    result.error = String(error);
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(result));
  process.exit(ok(result) ? 0 : 1);
}
