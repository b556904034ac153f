// Opens the Sentinella dashboard in headless Chromium (the Debian package, driven by
// playwright-core; no browser is downloaded) as each client of a scenario, logs in with its token
// through the login form, and prints what the page showed as JSON on stdout: every number
// (`data-n`) with its link, the viewer line, the region choices, the session cookie's attributes,
// and every request the page made (it must fetch nothing from elsewhere).
//
// usage: node dashboard.mjs SCENARIO.json
// SCENARIO: {"base": "http://127.0.0.1:PORT", "chromium": "/usr/bin/chromium",
//            "screenshot": "/path.png", "clients": [{"name": "admin", "token": "…", "query": "…"}]}
import { chromium } from 'playwright-core';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const scenario = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

async function visit(client) {
  const profile = mkdtempSync(join(tmpdir(), 'sentinella-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: scenario.chromium,
    headless: true,
    args: ARGS,
    viewport: { width: 1280, height: 900 },
    locale: 'it-IT',
    timezoneId: 'Europe/Rome',
  });
  const requests = [];
  context.on('request', (r) => requests.push(r.url()));
  try {
    const page = context.pages()[0] ?? (await context.newPage());
    page.setDefaultTimeout(30000);
    const query = client.query ? `?${client.query}` : '';
    await page.goto(`${scenario.base}/dashboard${query}`);
    const out = { name: client.name, loginRedirect: new URL(page.url()).pathname };
    await page.fill('#token', client.token);
    const [response] = await Promise.all([
      page.waitForNavigation(),
      page.click('button[type=submit]'),
    ]);
    out.status = response.status();
    out.path = new URL(page.url()).pathname;
    out.cookies = (await context.cookies()).map((c) => ({
      name: c.name, path: c.path, httpOnly: c.httpOnly, sameSite: c.sameSite,
    }));
    if (out.path === '/dashboard' && out.status === 200) {
      if (client.query) {
        await page.goto(`${scenario.base}/dashboard?${client.query}`);
      }
      out.numbers = await page.$$eval('[data-n]', (els) =>
        Object.fromEntries(els.map((e) => [e.dataset.n, { n: Number(e.textContent), href: e.getAttribute('href') }])));
      out.viewer = await page.textContent('#utente');
      out.scope = await page.textContent('#ambito');
      out.regions = await page.$$eval('select[name=regione] option', (os) => os.map((o) => o.value));
      out.sections = await page.$$eval('section[id]', (ss) => ss.map((s) => s.id));
      out.charts = await page.$$eval('svg.grafico', (ss) => ss.map((s) => s.querySelectorAll('rect').length));
      if (client.screenshot) {
        await page.screenshot({ path: scenario.screenshot, fullPage: true });
      }
      // logging out ends the session: the next visit is sent to the login form
      await Promise.all([page.waitForNavigation(), page.click('header button[type=submit]')]);
      out.afterLogout = new URL(page.url()).pathname;
      out.cookiesAfterLogout = (await context.cookies()).length;
    } else {
      out.message = await page.textContent('#messaggio').catch(() => null);
    }
    out.requests = requests;
    return out;
  } finally {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

const results = [];
for (const client of scenario.clients) {
  results.push(await visit(client));
}
process.stdout.write(JSON.stringify(results));
