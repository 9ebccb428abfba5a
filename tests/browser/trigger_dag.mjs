// Log in to the Airflow UI with headless Debian chromium, open a DAG, trigger it from the UI
// (the trigger dialog), then watch the run's page until the run finishes; save a screenshot.
// Env: AIRFLOW_URL, AIRFLOW_USER, AIRFLOW_PASSWORD, DAG_ID, SCREENSHOT, TIMEOUT_S (default 300).
// Prints one JSON line: {"run_id": ..., "state": ..., "screenshot": ...}; exit 0 only on success.
import { SCREENSHOT_TIMEOUT_MS, env, run } from './chromium.mjs';

const base = env('AIRFLOW_URL').replace(/\/$/, '');
const dagId = env('DAG_ID');
const screenshot = env('SCREENSHOT');
const deadline = Date.now() + 1000 * Number(env('TIMEOUT_S', '300'));
const FINAL = new Set(['success', 'failed']);

const result = { run_id: null, state: null, screenshot };
await run(result, async (browser) => {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  await page.goto(`${base}/`);
  await page.getByLabel('Username').fill(env('AIRFLOW_USER'));
  await page.getByLabel('Password').fill(env('AIRFLOW_PASSWORD'));
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.waitForURL((url) => !url.pathname.startsWith('/auth/login'), { timeout: 30000 });

  await page.goto(`${base}/dags/${dagId}`);
  await page.getByRole('button', { name: 'Trigger' }).first().click();
  const dialog = page.getByRole('dialog');
  await dialog.getByText(`Trigger Dag - ${dagId}`).waitFor({ timeout: 30000 });
  await dialog.getByRole('button', { name: 'Trigger' }).click();
  // the UI moves to the new run's page
  await page.waitForURL(new RegExp(`/dags/${dagId}/runs/.+`), { timeout: 30000 });
  result.run_id = decodeURIComponent(new URL(page.url()).pathname.split('/runs/')[1]);
  console.error(`triggered ${dagId} from the UI: run ${result.run_id}`);

  const badge = page.locator(
    `xpath=//h2[normalize-space(text())=${JSON.stringify(result.run_id)}]/following-sibling::*[@data-testid="state-badge"]`);
  while (Date.now() < deadline) {
    // a loaded machine can take the UI past the default 30 s: a slow reload is tried again, within the deadline
    if (!(await page.reload({ timeout: 60000 }).then(() => true, () => false))) continue;
    const text = (await badge.first().innerText({ timeout: 20000 }).catch(() => '')).trim().toLowerCase();
    if (text && text !== result.state) console.error(`run state in the UI: ${text}`);
    result.state = text || result.state;
    if (FINAL.has(result.state)) break;
    await page.waitForTimeout(3000);
  }
  await page.screenshot({ path: screenshot, fullPage: true, timeout: SCREENSHOT_TIMEOUT_MS });
}, (r) => r.state === 'success');
