// Uploads one file with the real Resumable.js or Flow.js in headless Chromium, through the demo
// page (src/demo/page.html), and prints what the browser saw as one JSON line:
//   {"size":…, "sha256":"…", "result":{"ok":true,"message":"…"}, "events":[…]}
// Usage: node upload.mjs PAGE_URL resumable|flow SIZE FILE_NAME [OPTIONS_JSON]
import { chromium } from 'playwright-core';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const [pageUrl, library, sizeText, fileName, options = '{}'] = process.argv.slice(2);
const size = Number(sizeText);
const work = mkdtempSync(join(tmpdir(), 'stitch-browser-'));
try {
  const data = randomBytes(size);
  mkdirSync(join(work, 'files'));
  const filePath = join(work, 'files', fileName);
  writeFileSync(filePath, data);
  const context = await chromium.launchPersistentContext(join(work, 'profile'), {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = await context.newPage();
    const url = `${pageUrl}?library=${library}&options=${encodeURIComponent(options)}`;
    await page.goto(url);
    await page.setInputFiles('#file', filePath);
    await page.waitForFunction(() => window.stitchResult !== null, null, { timeout: 120_000 });
    const result = await page.evaluate(() => window.stitchResult);
    const events = await page.evaluate(() => window.stitchEvents);
    const sha256 = createHash('sha256').update(data).digest('hex');
    console.log(JSON.stringify({ size, sha256, result, events }));
  } finally {
    await context.close();
  }
} finally {
  rmSync(work, { recursive: true, force: true });
}
