// The demo page's tus uploader across a page reload: picks a file (64 KiB PATCHes), reloads the
// page once a share of it is sent, picks the same file again, waits for it to finish, and prints
// as one JSON line what happened after the reload:
//   {"before":…, "sha256":"…", "result":{…}, "requests":{"HEAD":…, "PATCH":…}, "received":[…]}
// Usage: node demo-reload.mjs PAGE_URL SIZE
import { chromium } from 'playwright-core';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const [pageUrl, sizeText] = process.argv.slice(2);
const work = mkdtempSync(join(tmpdir(), 'stitch-demo-reload-'));
try {
  const data = randomBytes(Number(sizeText));
  mkdirSync(join(work, 'files'));
  const path = join(work, 'files', 'video.mp4');
  writeFileSync(path, data);
  const context = await chromium.launchPersistentContext(join(work, 'profile'), {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = await context.newPage();
    const options = encodeURIComponent(JSON.stringify({ chunkSize: 64 * 1024 }));
    await page.goto(`${pageUrl}?library=tus&options=${options}`);
    await page.setInputFiles('#file', path);
    await page.waitForFunction(() => (window.stitchFiles[0] || {}).progress > 0.4,
      null, { timeout: 60_000, polling: 20 });
    const before = await page.evaluate(() => window.stitchFiles[0].progress);
    await page.reload();
    const requests = {};
    page.on('request', request => {
      if (new URL(request.url()).pathname.startsWith('/files')) {
        requests[request.method()] = (requests[request.method()] || 0) + 1;
      }
    });
    await page.setInputFiles('#file', path);
    await page.waitForFunction(() => window.stitchResult !== null, null, { timeout: 60_000 });
    const result = await page.evaluate(() => window.stitchResult);
    const received = await page.evaluate(async () => (await fetch('/received')).json());
    const sha256 = createHash('sha256').update(data).digest('hex');
    console.log(JSON.stringify({ before, sha256, result, requests, received }));
  } finally {
    await context.close();
  }
} finally {
  rmSync(work, { recursive: true, force: true });
}
