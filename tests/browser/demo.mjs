// Drives the demo page (`stitch demo`) as a person would: picks several files at once, pauses
// while they upload, resumes, waits for every file to finish (one is refused), takes a
// screenshot, and prints what the page showed as one JSON line:
//   {"files":[…], "received":[…], "sha256":{name: hex}, "paused":{"before":…, "after":…}}
// Usage: node demo.mjs PAGE_URL resumable|flow SCREENSHOT.png NAME:SIZE...
import { chromium } from 'playwright-core';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const [pageUrl, library, screenshot, ...specs] = process.argv.slice(2);
const work = mkdtempSync(join(tmpdir(), 'stitch-demo-'));
const total = files => files.reduce((sum, f) => sum + f.progress * f.size, 0);
try {
  mkdirSync(join(work, 'files'));
  const sha256 = {};
  const paths = specs.map(spec => {
    const [name, size] = spec.split(':');
    const data = randomBytes(Number(size));
    sha256[name] = createHash('sha256').update(data).digest('hex');
    const path = join(work, 'files', name);
    writeFileSync(path, data);
    return path;
  });
  const context = await chromium.launchPersistentContext(join(work, 'profile'), {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1100, height: 900 },
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = await context.newPage();
    // Small chunks, so that there is time to pause mid-upload.
    const options = encodeURIComponent(JSON.stringify({ chunkSize: 64 * 1024 }));
    await page.goto(`${pageUrl}?library=${library}&options=${options}`);
    await page.setInputFiles('#file', paths);
    await page.waitForFunction(
      () => window.stitchFiles.some(f => f.progress > 0.1 && f.progress < 0.6),
      null, { timeout: 60_000, polling: 20 });
    await page.click('#pause');
    await page.waitForTimeout(500); // requests aborted by the pause settle
    const before = total(await page.evaluate(() => window.stitchFiles));
    await page.waitForTimeout(1500);
    const after = total(await page.evaluate(() => window.stitchFiles));
    const states = (await page.evaluate(() => window.stitchFiles)).map(f => f.state);
    await page.click('#resume');
    await page.waitForFunction(
      count => window.stitchFiles.length === count &&
        window.stitchFiles.every(f => f.state === 'uploaded' || f.state === 'failed'),
      paths.length, { timeout: 120_000 });
    await page.waitForFunction(
      count => (window.stitchReceived || []).length >= count,
      (await page.evaluate(() => window.stitchFiles.filter(f => f.state === 'uploaded').length)),
      { timeout: 10_000 });
    await page.screenshot({ path: screenshot, fullPage: true });
    const files = await page.evaluate(() => window.stitchFiles);
    const received = await page.evaluate(() => window.stitchReceived);
    const text = await page.evaluate(() => document.body.innerText);
    console.log(JSON.stringify({ files, received, sha256, paused: { before, after, states }, text }));
  } finally {
    await context.close();
  }
} finally {
  rmSync(work, { recursive: true, force: true });
}
