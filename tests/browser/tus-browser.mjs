// Uploads one file of random bytes with tus-js-client's or Uppy's browser bundle in headless
// Chromium, through the test page tests/browser/tus.html, and prints what the browser saw as
// one JSON line:
//   {"size":…, "sha256":"…", "result":{"ok":…, "error":…, "status":…, "url":…, "answer":{…}},
//    "requests":["POST /files", "PATCH /files/…", …]}
// Usage: node tus-browser.mjs PAGE_URL tus-js-client|uppy SIZE FILE_NAME [OPTIONS_JSON]
import { chromium } from 'playwright-core';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const [pageUrl, client, sizeText, fileName, options = '{}'] = process.argv.slice(2);
const size = Number(sizeText);
const work = mkdtempSync(join(tmpdir(), 'stitch-tus-browser-'));
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
    const errors = [];
    page.on('pageerror', error => errors.push(String(error)));
    const separator = pageUrl.includes('?') ? '&' : '?';
    await page.goto(`${pageUrl}${separator}client=${client}&options=${encodeURIComponent(options)}`);
    const loaded = await page.evaluate(() => [typeof tus, typeof Uppy]);
    if (loaded.includes('undefined')) throw new Error(`a library did not load: ${loaded}`);
    await page.setInputFiles('#file', filePath);
    try {
      await page.waitForFunction(() => window.tusResult !== null, null, { timeout: 90_000 });
    } catch (e) {
      throw new Error(`no result within 90 s (page errors: ${errors.join('; ')}): ${e.message}`);
    }
    const result = await page.evaluate(() => window.tusResult);
    const requests = await page.evaluate(() => window.tusRequests);
    const sha256 = createHash('sha256').update(data).digest('hex');
    console.log(JSON.stringify({ size, sha256, result, requests }));
  } finally {
    await context.close();
  }
} finally {
  rmSync(work, { recursive: true, force: true });
}
