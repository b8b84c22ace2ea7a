// End-to-end test of `temper review` in a real browser (Debian's Chromium,
// driven by playwright-core). Run: cd tests/review && npm ci && node --test
//
// The server binary is $TEMPER_BIN, else ${CARGO_TARGET_DIR:-target}/release/temper
// (relative to the repository root). REVIEW_MOCK=1 runs mock-server.mjs instead,
// to work on the page without building. REVIEW_SCREENSHOT=path saves a
// 1280x800 screenshot of the page.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import http from 'node:http';
import { existsSync, readFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, '../..');
const MOCK = process.env.REVIEW_MOCK === '1';
const BIN = process.env.TEMPER_BIN
  ? resolve(root, process.env.TEMPER_BIN)
  : resolve(root, process.env.CARGO_TARGET_DIR || 'target', 'release', 'temper');
const CHROMIUM = '/usr/bin/chromium';
const SAMPLES = join(here, 'samples.jsonl');
const COMMENT = 'mouse judged: <b>not bold</b> & fine';

const outDir = mkdtempSync(join(tmpdir(), 'temper-review-'));
const live = new Set();
let browser = null;
const foreign = []; // requests to hosts other than this machine
const pageErrors = [];

after(async () => {
  for (const child of live) child.kill('SIGKILL');
  if (browser) await browser.close().catch(() => {});
  rmSync(outDir, { recursive: true, force: true });
});

function prerequisites() {
  if (!MOCK && !existsSync(BIN)) {
    assert.fail(`temper binary not found at ${BIN}: run \`cargo build --release\` first, or set TEMPER_BIN`);
  }
  if (!existsSync(CHROMIUM)) {
    assert.fail(`${CHROMIUM} not found: install Debian's chromium (apt-get install chromium)`);
  }
}

// The fixture: rows of {row, model, prompt, output}, grouped by row.
const fixture = new Map();
for (const line of readFileSync(SAMPLES, 'utf8').split('\n').filter((l) => l.trim())) {
  const s = JSON.parse(line);
  if (!fixture.has(s.row)) fixture.set(s.row, { prompt: s.prompt, outputs: {} });
  fixture.get(s.row).outputs[s.model] = s.output;
}
const SIDES = ['base', 'adapter'];

const withTimeout = (promise, ms, what) =>
  Promise.race([promise, new Promise((_, reject) => setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms).unref())]);

async function startServer() {
  const args = ['review', '--samples', SAMPLES, '--output', outDir, '--port', '0', '--rubric', 'faithfulness', '--rubric', 'helpfulness'];
  const [cmd, argv] = MOCK ? [process.execPath, [join(here, 'mock-server.mjs'), ...args]] : [BIN, args];
  const child = spawn(cmd, argv, { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(child);
  child.exited = new Promise((res) => child.on('exit', (code, signal) => { live.delete(child); res({ code, signal }); }));
  let out = '';
  let err = '';
  child.stderr.on('data', (d) => { err += d; });
  const started = new Promise((res, rej) => {
    child.stdout.on('data', (d) => {
      out += d;
      const m = /^review: (http:\/\/127\.0\.0\.1:\d+\/) \((\d+) prompts?, (\d+) judged\)\s*$/m.exec(out);
      if (m) res({ url: m[1], prompts: Number(m[2]), judged: Number(m[3]) });
    });
    child.on('error', (e) => rej(new Error(`cannot start ${cmd}: ${e.message}`)));
    child.exited.then(({ code, signal }) => rej(new Error(`server exited (${code ?? signal}) before printing its URL\nstdout: ${out}\nstderr: ${err}`)));
  });
  try {
    const info = await withTimeout(started, 30_000, `waiting for "review: http://..." from ${cmd}\nstdout: ${out}\nstderr: ${err}`);
    return { child, ...info };
  } catch (e) {
    child.kill('SIGKILL');
    throw e;
  }
}

async function stopServer(server) {
  if (server.child.exitCode === null && server.child.signalCode === null) server.child.kill('SIGKILL');
  await withTimeout(server.child.exited, 10_000, 'server exit');
}

async function openPage(url) {
  if (!browser) {
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
      timeout: 30_000,
    });
  }
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  page.setDefaultTimeout(10_000);
  page.on('request', (r) => {
    const u = new URL(r.url());
    if (/^https?:$|^wss?:$/.test(u.protocol) && !['127.0.0.1', 'localhost', '[::1]'].includes(u.hostname)) foreign.push(r.url());
    if (u.pathname === '/x') foreign.push(`${r.url()} (the <img src=x> of an answer was rendered as HTML)`);
  });
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  await goto(page, url);
  return page;
}

async function goto(page, url) {
  await page.goto(url);
  await page.waitForFunction(() => /\d+ of \d+/.test(document.querySelector('#progress')?.textContent || ''));
}

const text = (page, sel) => page.locator(sel).textContent();
const pressed = async (page, sel) => (await page.getAttribute(sel, 'aria-pressed')) === 'true';

async function state(url) {
  const res = await fetch(new URL('api/state', url));
  assert.equal(res.status, 200);
  return res.json();
}

// For each item of /api/state: its fixture row and which model sits in each slot.
function mapItems(st) {
  return st.items.map((item) => {
    const row = [...fixture.values()].find((r) => r.outputs.base === item.answers.A || r.outputs.base === item.answers.B);
    assert.ok(row, `item ${item.id}: its answers are not in the fixture`);
    const A = row.outputs.base === item.answers.A ? 'base' : 'adapter';
    const B = A === 'base' ? 'adapter' : 'base';
    assert.equal(item.answers.A, row.outputs[A], `item ${item.id}: slot A`);
    assert.equal(item.answers.B, row.outputs[B], `item ${item.id}: slot B`);
    return { id: item.id, row, slots: { A, B }, slotOf: { [A]: 'A', [B]: 'B' } };
  });
}

async function waitItem(page, id) {
  await page.waitForFunction((want) => document.querySelector('#item-id')?.textContent === want, id);
}

async function progress(page) {
  const m = /(\d+) of (\d+)/.exec(await text(page, '#progress'));
  assert.ok(m, 'progress line');
  return [Number(m[1]), Number(m[2])];
}

// Do `action` (a click or a key press) and return the /api/judge response.
async function judge(page, action) {
  const response = page.waitForResponse((r) => r.url().endsWith('/api/judge'));
  await action();
  return response;
}

const readJsonl = (name) => {
  const path = join(outDir, name);
  return existsSync(path) ? readFileSync(path, 'utf8').split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l)) : [];
};

const asCompletion = (prompt, content) => (typeof prompt === 'string' ? content : [{ role: 'assistant', content }]);

let items = null; // filled by the first test
const expected = new Map(); // id -> what feedback.jsonl must say, by side name

function checkFeedback(rec, id) {
  const want = expected.get(id);
  assert.equal(String(rec.id), id);
  assert.equal(rec.winner ?? null, want.winner, `item ${id}: winner`);
  for (const side of SIDES) {
    assert.equal(rec.thumbs?.[side] ?? null, want.thumbs[side] ?? null, `item ${id}: thumb of ${side}`);
    assert.deepEqual(rec.scores?.[side] ?? {}, want.scores[side] ?? {}, `item ${id}: scores of ${side}`);
  }
  assert.equal(rec.comment ?? '', want.comment ?? '', `item ${id}: comment`);
}

test('the page loads and shows dataset text literally', { timeout: 90_000 }, async () => {
  prerequisites();
  const server = await startServer();
  try {
    assert.equal(server.prompts, 6);
    assert.equal(server.judged, 0);
    const st = await state(server.url);
    assert.deepEqual(st.summary.sides.map((s) => s.name), SIDES);
    assert.deepEqual(st.rubric.map((c) => c.name), ['faithfulness', 'helpfulness']);
    items = mapItems(st);
    assert.equal(items.length, 6);
    assert.deepEqual(items.map((i) => i.row), [...fixture.values()], 'items in row order');

    const page = await openPage(server.url);
    assert.deepEqual(await progress(page), [0, 6]);
    assert.match(await text(page, '#progress'), /\b0 of 6 judged/);
    await waitItem(page, items[0].id);

    // Row 0: the adapter's answer holds markup, which must show as text.
    const [first] = items;
    const slot = first.slotOf.adapter;
    assert.equal(await text(page, `#answer-${slot}`), first.row.outputs.adapter);
    assert.match(await text(page, `#answer-${slot}`), /<script>window\.__xss=1<\/script><img src=x onerror="window\.__xss=1"> 5$/);
    assert.equal(await text(page, `#answer-${first.slotOf.base}`), first.row.outputs.base);
    await page.waitForTimeout(500);
    assert.equal(await page.evaluate(() => window.__xss), undefined, 'a script of an answer ran');
    assert.equal(await page.locator('#answer-A script, #answer-A img, #answer-B script, #answer-B img').count(), 0);
    assert.match(await text(page, '#prompt'), /What is 2\+3\?/);
    assert.equal(await page.$eval('#answer-A', (e) => getComputedStyle(e).whiteSpace), 'pre-wrap');

    // The rubric: buttons 1..5 per criterion and slot.
    for (const s of ['A', 'B']) {
      for (const c of ['faithfulness', 'helpfulness']) {
        for (let n = 1; n <= 5; n++) assert.equal(await page.locator(`#score-${s}-${c}-${n}`).count(), 1, `#score-${s}-${c}-${n}`);
      }
    }
    assert.equal(await page.locator('#score-A-faithfulness-6').count(), 0);
    const summary = await text(page, '#summary');
    for (const side of SIDES) assert.ok(summary.includes(side), `summary names ${side}`);

    // Saving with nothing picked is refused by the server, and the page says so.
    const refused = await judge(page, () => page.keyboard.press('Enter'));
    assert.equal(refused.status(), 400);
    await page.waitForFunction(() => (document.querySelector('#error')?.textContent || '').trim() !== '');
    assert.ok(await page.isVisible('#error'));
    assert.equal(await text(page, '#item-id'), items[0].id);
    assert.equal(readJsonl('feedback.jsonl').length, 0);

    // A multi-message prompt, then unicode; j/k move between items.
    await page.keyboard.press('j');
    await waitItem(page, items[1].id);
    const promptText = await text(page, '#prompt');
    for (const m of items[1].row.prompt) {
      assert.ok(promptText.includes(m.content), `prompt shows "${m.content}"`);
      assert.ok(promptText.toLowerCase().includes(m.role), `prompt shows role ${m.role}`);
    }
    await page.keyboard.press('ArrowRight');
    await waitItem(page, items[2].id);
    assert.equal(await text(page, `#answer-${items[2].slotOf.adapter}`), items[2].row.outputs.adapter);
    assert.ok((await text(page, '#prompt')).includes(items[2].row.prompt));
    await page.keyboard.press('k');
    await page.keyboard.press('ArrowLeft');
    await waitItem(page, items[0].id);

    assert.deepEqual(pageErrors, []);
    assert.deepEqual(foreign, []);
    await page.context().close();
  } finally {
    await stopServer(server);
  }
});

test('judging by mouse and keyboard writes feedback, preferences and KTO rows', { timeout: 90_000 }, async () => {
  prerequisites();
  assert.ok(items, 'needs the first test');
  const server = await startServer();
  try {
    assert.equal(server.judged, 0);
    const page = await openPage(server.url);
    await waitItem(page, items[0].id);

    // Item 0 by mouse: thumb up and a score for A, a comment, then the adapter wins.
    const i0 = items[0];
    await page.click('#thumb-A-up');
    assert.ok(await pressed(page, '#thumb-A-up'));
    await page.click('#thumb-A-down');
    await page.click('#thumb-A-down'); // pressing again clears it
    assert.ok(!(await pressed(page, '#thumb-A-down')) && !(await pressed(page, '#thumb-A-up')));
    await page.click('#thumb-A-up');
    await page.click('#score-A-faithfulness-4');
    assert.ok(await pressed(page, '#score-A-faithfulness-4'));
    assert.ok(await page.locator('#score-A-faithfulness-4').evaluate((e) => e.classList.contains('selected')));
    await page.fill('#comment', COMMENT);
    let res = await judge(page, () => page.click(`#choose-${i0.slotOf.adapter}`));
    assert.equal(res.status(), 200, await res.text());
    expected.set(i0.id, {
      winner: 'adapter',
      thumbs: { [i0.slots.A]: 'up' },
      scores: { [i0.slots.A]: { faithfulness: 4 } },
      comment: COMMENT,
    });
    await waitItem(page, items[1].id);
    assert.deepEqual(await progress(page), [1, 6]);

    // Item 1 by keyboard: B is better.
    res = await judge(page, () => page.keyboard.press('2'));
    assert.equal(res.status(), 200);
    expected.set(items[1].id, { winner: items[1].slots.B, thumbs: {}, scores: {} });
    await waitItem(page, items[2].id);

    // Item 2: tie.
    res = await judge(page, () => page.keyboard.press('t'));
    assert.equal(res.status(), 200);
    expected.set(items[2].id, { winner: 'tie', thumbs: {}, scores: {} });
    await waitItem(page, items[3].id);

    // Item 3: a thumb only, saved with Enter.
    await page.keyboard.press('q');
    assert.ok(await pressed(page, '#thumb-A-up'));
    res = await judge(page, () => page.keyboard.press('Enter'));
    assert.equal(res.status(), 200);
    expected.set(items[3].id, { winner: null, thumbs: { [items[3].slots.A]: 'up' }, scores: {} });
    await waitItem(page, items[4].id);
    assert.deepEqual(await progress(page), [4, 6]);
    assert.match(await text(page, '#progress'), /\b4 of 6 judged/);

    // feedback.jsonl: one line per judgment, in order.
    const feedback = readJsonl('feedback.jsonl');
    assert.equal(feedback.length, 4);
    feedback.forEach((rec, k) => checkFeedback(rec, items[k].id));

    // preferences.jsonl: the two decided pairs.
    const prefs = readJsonl('preferences.jsonl');
    assert.equal(prefs.length, 2);
    for (const [k, item, winner] of [[0, i0, 'adapter'], [1, items[1], items[1].slots.B]]) {
      const loser = winner === 'base' ? 'adapter' : 'base';
      const { prompt, outputs } = item.row;
      assert.deepEqual(prefs[k].prompt, prompt, `preference ${k}: prompt`);
      assert.deepEqual(prefs[k].chosen, asCompletion(prompt, outputs[winner]), `preference ${k}: chosen`);
      assert.deepEqual(prefs[k].rejected, asCompletion(prompt, outputs[loser]), `preference ${k}: rejected`);
    }
    assert.ok(Array.isArray(prefs[1].prompt), 'a message prompt stays a message list');

    // kto.jsonl: one row per thumb.
    const kto = readJsonl('kto.jsonl');
    assert.equal(kto.length, 2);
    for (const [k, item] of [[0, i0], [1, items[3]]]) {
      const { prompt, outputs } = item.row;
      assert.deepEqual(kto[k].prompt, prompt, `kto ${k}: prompt`);
      assert.deepEqual(kto[k].completion, asCompletion(prompt, outputs[item.slots.A]), `kto ${k}: completion`);
      assert.equal(kto[k].label, true, `kto ${k}: label`);
    }

    assert.deepEqual(pageErrors, []);
    assert.deepEqual(foreign, []);
    await page.context().close();
  } finally {
    await stopServer(server);
  }
});

test('progress survives a killed server; the summary adds up', { timeout: 120_000 }, async () => {
  prerequisites();
  assert.ok(items && expected.size === 4, 'needs the tests before');
  let server = await startServer();
  try {
    assert.equal(server.judged, 4);
    const page = await openPage(server.url);
    await waitItem(page, items[4].id);
    assert.deepEqual(await progress(page), [4, 6]);

    // Going back shows what was recorded.
    await page.keyboard.press('k');
    await waitItem(page, items[3].id);
    assert.ok(await pressed(page, '#thumb-A-up'));
    for (const c of ['A', 'B', 'tie']) assert.ok(!(await pressed(page, `#choose-${c}`)), `item 3: #choose-${c}`);
    await page.keyboard.press('k');
    await waitItem(page, items[2].id);
    assert.ok(await pressed(page, '#choose-tie'));
    await page.keyboard.press('k');
    await page.keyboard.press('k');
    await waitItem(page, items[0].id);
    assert.ok(await pressed(page, `#choose-${items[0].slotOf.adapter}`));
    assert.ok(await pressed(page, '#thumb-A-up'));
    assert.ok(await pressed(page, '#score-A-faithfulness-4'));
    assert.ok(!(await pressed(page, '#score-A-faithfulness-3')));
    assert.equal(await page.inputValue('#comment'), COMMENT);
    for (let k = 0; k < 4; k++) await page.keyboard.press('j');
    await waitItem(page, items[4].id);

    // Judge item 4, and kill the server the moment its answer arrives.
    const res = await judge(page, () => page.click('#choose-A'));
    server.child.kill('SIGKILL');
    assert.equal(res.status(), 200);
    expected.set(items[4].id, { winner: items[4].slots.A, thumbs: {}, scores: {} });
    await stopServer(server);
    assert.equal(readJsonl('feedback.jsonl').length, 5);

    server = await startServer();
    assert.equal(server.judged, 5);
    await goto(page, server.url);
    assert.deepEqual(await progress(page), [5, 6]);
    await waitItem(page, items[5].id);
    const feedback = readJsonl('feedback.jsonl');
    assert.equal(feedback.length, 5);
    feedback.forEach((rec, k) => checkFeedback(rec, items[k].id));

    // The last item, then everything is judged.
    const done = await judge(page, () => page.keyboard.press('b'));
    assert.equal(done.status(), 200);
    expected.set(items[5].id, { winner: items[5].slots.B, thumbs: {}, scores: {} });
    await page.waitForFunction(() => /all judged/i.test(document.body.innerText));
    assert.deepEqual(await progress(page), [6, 6]);
    await checkSummary(page, server.url);

    // Re-judging an item replaces its judgment: the tie of item 2 becomes "A is better".
    for (let k = 0; k < 4; k++) await page.keyboard.press('k');
    await waitItem(page, items[2].id);
    assert.ok(await pressed(page, '#choose-tie'));
    const again = await judge(page, () => page.keyboard.press('1'));
    assert.equal(again.status(), 200);
    expected.set(items[2].id, { winner: items[2].slots.A, thumbs: {}, scores: {} });
    await page.waitForFunction(() => /all judged/i.test(document.body.innerText));
    const all = readJsonl('feedback.jsonl');
    assert.equal(all.length, 7);
    checkFeedback(all[6], items[2].id);
    const summary = await checkSummary(page, server.url);
    assert.equal(summary.ties, 0);

    if (process.env.REVIEW_SCREENSHOT) {
      await page.keyboard.press('j'); // from "All judged" to the first item
      await waitItem(page, items[0].id);
      await page.screenshot({ path: resolve(process.env.REVIEW_SCREENSHOT) });
    }

    assert.deepEqual(pageErrors, []);
    assert.deepEqual(foreign, []);
    await page.context().close();
  } finally {
    await stopServer(server);
  }
});

// Compare /api/state's summary with the judgments made, and the page with it.
async function checkSummary(page, url) {
  const { summary } = await state(url);
  const latest = [...expected.values()];
  const pairs = latest.filter((j) => j.winner != null).length;
  const ties = latest.filter((j) => j.winner === 'tie').length;
  assert.equal(summary.judged, expected.size);
  assert.equal(summary.total, 6);
  assert.equal(summary.pairs, pairs);
  assert.equal(summary.ties, ties);
  const shown = await text(page, '#summary');
  for (const side of summary.sides) {
    const wins = latest.filter((j) => j.winner === side.name).length;
    assert.equal(side.wins, wins, `${side.name}: wins`);
    assert.ok(Math.abs(side.win_rate - (wins + ties / 2) / pairs) < 1e-9, `${side.name}: win rate ${side.win_rate}`);
    assert.ok(side.ci[0] <= side.win_rate && side.win_rate <= side.ci[1] && side.ci[0] >= 0 && side.ci[1] <= 1, `${side.name}: interval ${side.ci}`);
    assert.equal(side.thumbs_up, latest.filter((j) => j.thumbs[side.name] === 'up').length, `${side.name}: thumbs up`);
    assert.equal(side.thumbs_down, 0, `${side.name}: thumbs down`);
    const pct = (x) => Math.round(x * 100);
    const rate = `${pct(side.win_rate)}% (${pct(side.ci[0])}–${pct(side.ci[1])}%)`;
    assert.ok(shown.includes(side.name), `summary shows ${side.name}`);
    assert.ok(shown.includes(rate), `summary shows ${side.name}'s win rate as "${rate}": ${shown}`);
  }
  for (const side of summary.sides) {
    const given = latest.map((j) => j.scores[side.name]?.faithfulness).filter((v) => v != null);
    const mean = given.length ? given.reduce((a, b) => a + b, 0) / given.length : null;
    assert.equal(side.scores?.faithfulness ?? null, mean, `${side.name}: mean faithfulness`);
    if (mean != null) assert.ok(shown.includes(mean.toFixed(1)), `summary shows ${side.name}'s mean faithfulness`);
  }
  return summary;
}

// Raw HTTP (fetch may not set Host or Origin): what a page of another site could send.
function raw(url, { method = 'GET', headers = {}, body = '' } = {}) {
  const u = new URL(url);
  return withTimeout(new Promise((res, rej) => {
    const req = http.request({ host: u.hostname, port: u.port, path: u.pathname, method, headers }, (r) => {
      let data = '';
      r.on('data', (d) => { data += d; });
      r.on('end', () => res({ status: r.statusCode, headers: r.headers, body: data }));
    });
    req.on('error', rej);
    req.end(body);
  }), 10_000, `${method} ${url}`);
}

test('only this server\'s own page may read or post, and it cannot be framed', { skip: MOCK }, async () => {
  prerequisites();
  const server = await startServer();
  try {
    const feedback = join(outDir, 'feedback.jsonl');
    const before = existsSync(feedback) ? readFileSync(feedback, 'utf8') : '';
    const judge = JSON.stringify({ id: '0', choice: 'A' });
    const json = { 'Content-Type': 'application/json' };
    const page = await raw(server.url);
    assert.equal(page.status, 200);
    assert.equal(page.headers['x-frame-options'], 'DENY');
    assert.match(page.headers['content-security-policy'], /frame-ancestors 'none'/);
    // DNS rebinding: the right address under another name.
    assert.equal((await raw(`${server.url}api/state`, { headers: { Host: 'evil.example:80' } })).status, 403);
    // Another origin posting.
    const cross = await raw(`${server.url}api/judge`, { method: 'POST', headers: { ...json, Origin: 'http://evil.example' }, body: judge });
    assert.equal(cross.status, 403);
    // A form-like post (no preflight in a browser) is refused.
    const plain = await raw(`${server.url}api/judge`, { method: 'POST', headers: { 'Content-Type': 'text/plain' }, body: judge });
    assert.equal(plain.status, 415);
    assert.equal(existsSync(feedback) ? readFileSync(feedback, 'utf8') : '', before, 'nothing was recorded');
  } finally {
    await stopServer(server);
  }
});
