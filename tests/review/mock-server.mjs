// A stand-in for `temper review`, implementing the same HTTP contract, for
// developing src/review.html and review.test.mjs without building the Rust
// binary. The test uses it only when REVIEW_MOCK=1 is set.
//
//   node mock-server.mjs review --samples FILE --output DIR [--port N] [--rubric NAME]... [--seed N]
import { createServer } from 'node:http';
import { readFileSync, existsSync, mkdirSync, appendFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
if (args[0] === 'review') args.shift();
const opt = { port: 0, rubric: [], seed: '0' };
for (let i = 0; i < args.length; i += 2) {
  const key = args[i].replace(/^--/, '');
  if (key === 'rubric') opt.rubric.push(args[i + 1]);
  else opt[key] = args[i + 1];
}
if (!opt.samples || !opt.output) {
  console.error('usage: mock-server.mjs review --samples FILE --output DIR [--port N] [--rubric NAME]...');
  process.exit(2);
}

// Samples: one line per (row, model); the first two models seen are the sides.
const rows = new Map();
const models = [];
for (const line of readFileSync(opt.samples, 'utf8').split('\n')) {
  if (!line.trim()) continue;
  const s = JSON.parse(line);
  if (!models.includes(s.model)) models.push(s.model);
  if (!rows.has(s.row)) rows.set(s.row, { prompt: s.prompt, outputs: {} });
  rows.get(s.row).outputs[s.model] = s.output;
}
const sides = models.slice(0, 2);
const items = [...rows.entries()]
  .filter(([, r]) => sides.every((m) => m in r.outputs))
  .map(([row, r]) => {
    const flip = createHash('sha256').update(`${opt.seed}:${row}`).digest()[0] & 1;
    return { id: String(row), prompt: r.prompt, outputs: r.outputs, slots: flip ? { A: sides[1], B: sides[0] } : { A: sides[0], B: sides[1] } };
  });
const byId = new Map(items.map((it) => [it.id, it]));
const rubric = opt.rubric.map((name) => ({ name, description: `How good is the answer on ${name}`, min: 1, max: 5 }));

mkdirSync(opt.output, { recursive: true });
const files = { feedback: join(opt.output, 'feedback.jsonl'), prefs: join(opt.output, 'preferences.jsonl'), kto: join(opt.output, 'kto.jsonl') };

// Latest judgment per item, keyed by side name (as written to feedback.jsonl).
const latest = new Map();
if (existsSync(files.feedback)) {
  for (const line of readFileSync(files.feedback, 'utf8').split('\n')) {
    if (!line.trim()) continue;
    try { const r = JSON.parse(line); latest.set(r.id, r); } catch { /* a torn last line */ }
  }
}

const asMessages = (prompt) => (typeof prompt === 'string' ? [{ role: 'prompt', content: prompt }] : prompt);
const completion = (item, model) => (typeof item.prompt === 'string' ? item.outputs[model] : [{ role: 'assistant', content: item.outputs[model] }]);

function toSlots(item, rec) {
  if (!rec) return null;
  const m = item.slots;
  const choice = rec.winner == null ? null : rec.winner === 'tie' ? 'tie' : rec.winner === m.A ? 'A' : 'B';
  return {
    choice,
    thumbs: { A: rec.thumbs[m.A] ?? null, B: rec.thumbs[m.B] ?? null },
    scores: { A: rec.scores[m.A] || {}, B: rec.scores[m.B] || {} },
    comment: rec.comment ?? '',
  };
}

function wilson(k, n, z = 1.96) {
  const p = k / n, d = 1 + (z * z) / n;
  const c = (p + (z * z) / (2 * n)) / d;
  const h = (z * Math.sqrt((p * (1 - p)) / n + (z * z) / (4 * n * n))) / d;
  return [Math.max(0, c - h), Math.min(1, c + h)];
}

function summary() {
  const recs = [...latest.values()];
  const pairs = recs.filter((r) => r.winner != null).length;
  const ties = recs.filter((r) => r.winner === 'tie').length;
  return {
    judged: recs.length, total: items.length, pairs, ties,
    sides: sides.map((name) => {
      const wins = recs.filter((r) => r.winner === name).length;
      const scores = {};
      for (const c of rubric) {
        const v = recs.map((r) => r.scores[name]?.[c.name]).filter((x) => x != null);
        if (v.length) scores[c.name] = v.reduce((a, b) => a + b, 0) / v.length;
      }
      return {
        name, wins,
        win_rate: pairs ? (wins + ties / 2) / pairs : null,
        ci: pairs ? wilson(wins + ties / 2, pairs) : null,
        thumbs_up: recs.filter((r) => r.thumbs[name] === 'up').length,
        thumbs_down: recs.filter((r) => r.thumbs[name] === 'down').length,
        scores,
      };
    }),
  };
}

function judge(body) {
  const item = byId.get(String(body?.id));
  if (!item) throw new Error(`unknown item id ${JSON.stringify(body?.id)}`);
  if (![null, undefined, 'A', 'B', 'tie'].includes(body.choice)) throw new Error(`bad choice ${JSON.stringify(body.choice)}`);
  const m = item.slots;
  const thumbs = {}, scores = {};
  for (const s of ['A', 'B']) {
    const t = body.thumbs?.[s] ?? null;
    if (![null, 'up', 'down'].includes(t)) throw new Error(`bad thumb ${JSON.stringify(t)}`);
    thumbs[m[s]] = t;
    scores[m[s]] = {};
    for (const [k, v] of Object.entries(body.scores?.[s] || {})) {
      const c = rubric.find((r) => r.name === k);
      if (!c || !Number.isInteger(v) || v < c.min || v > c.max) throw new Error(`bad score ${k}=${v}`);
      scores[m[s]][k] = v;
    }
  }
  const choice = body.choice ?? null;
  const anyScore = Object.values(scores).some((o) => Object.keys(o).length);
  if (choice == null && !Object.values(thumbs).some(Boolean) && !anyScore) throw new Error('nothing to record: pick a side, a thumb or a score');
  const winner = choice == null ? null : choice === 'tie' ? 'tie' : m[choice];
  const rec = { id: item.id, winner, thumbs, scores, comment: body.comment ?? '', slots: m, time: new Date().toISOString() };
  appendFileSync(files.feedback, JSON.stringify(rec) + '\n');
  if (winner && winner !== 'tie') {
    const loser = sides.find((s) => s !== winner);
    appendFileSync(files.prefs, JSON.stringify({ prompt: item.prompt, chosen: completion(item, winner), rejected: completion(item, loser) }) + '\n');
  }
  for (const side of sides) {
    if (thumbs[side]) appendFileSync(files.kto, JSON.stringify({ prompt: item.prompt, completion: completion(item, side), label: thumbs[side] === 'up' }) + '\n');
  }
  latest.set(item.id, rec);
}

const send = (res, code, type, body) => { res.writeHead(code, { 'Content-Type': type }); res.end(body); };
const json = (res, code, obj) => send(res, code, 'application/json', JSON.stringify(obj));

const server = createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/') return send(res, 200, 'text/html; charset=utf-8', readFileSync(join(here, '../../src/review.html')));
  if (req.method === 'GET' && req.url === '/api/state') {
    return json(res, 200, {
      title: `Temper review: ${sides.join(' vs ')}`,
      rubric,
      items: items.map((it) => ({ id: it.id, prompt: asMessages(it.prompt), answers: { A: it.outputs[it.slots.A], B: it.outputs[it.slots.B] }, judgment: toSlots(it, latest.get(it.id)) })),
      summary: summary(),
    });
  }
  if (req.method === 'POST' && req.url === '/api/judge') {
    let data = '';
    req.on('data', (c) => { data += c; });
    req.on('end', () => {
      try { judge(JSON.parse(data)); } catch (e) { return json(res, 400, { error: e.message }); }
      json(res, 200, { ok: true, summary: summary() });
    });
    return;
  }
  json(res, 404, { error: 'not found' });
});

server.listen(Number(opt.port), '127.0.0.1', () => {
  console.log(`review: http://127.0.0.1:${server.address().port}/ (${items.length} prompts, ${latest.size} judged)`);
});
