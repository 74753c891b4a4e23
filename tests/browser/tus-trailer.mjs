// tus by hand with Node's own HTTP/1.1 client, sending each PATCH's Upload-Checksum as a
// trailer (checksum-trailer): a chunked body streamed from the file, hashed as it goes, then
// `request.addTrailers(...)`. The first PATCH is sent once with a wrong checksum first (it
// must be refused with 460 and change nothing), then right.
//
// Usage: node tus-trailer.mjs '<json>' with { endpoint, file, filename, patchSize, algorithm }
// Prints one JSON line: { ok, error, url, statuses: [<status of each PATCH>], offset }.
import fs from 'node:fs';
import http from 'node:http';
import crypto from 'node:crypto';

const { endpoint, file, filename, patchSize, algorithm } = JSON.parse(process.argv[2]);
const size = fs.statSync(file).size;

function request(method, url, headers, body) {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method, headers: { 'Tus-Resumable': '1.0.0', ...headers } },
      (res) => {
        res.resume();
        res.on('end', () => resolve(res));
      });
    req.on('error', reject);
    if (body) body(req); else req.end();
  });
}

// A PATCH of the file's bytes [start, end) whose checksum follows as a trailer; `spoil`
// sends the checksum of other bytes.
function patch(url, start, end, spoil) {
  return request('PATCH', url, {
    'Content-Type': 'application/offset+octet-stream',
    'Upload-Offset': String(start),
    'Trailer': 'Upload-Checksum',
  }, (req) => {
    const hash = crypto.createHash(algorithm);
    const stream = fs.createReadStream(file, { start, end: end - 1, highWaterMark: 64 * 1024 });
    stream.on('data', (piece) => {
      hash.update(piece);
      if (!req.write(piece)) {
        stream.pause();
        req.once('drain', () => stream.resume());
      }
    });
    stream.on('end', () => {
      if (spoil) hash.update('spoiled');
      req.addTrailers({ 'Upload-Checksum': `${algorithm} ${hash.digest('base64')}` });
      req.end();
    });
  });
}

try {
  const metadata = `filename ${Buffer.from(filename).toString('base64')}`;
  const created = await request('POST', endpoint,
    { 'Upload-Length': String(size), 'Upload-Metadata': metadata });
  if (created.statusCode !== 201) throw new Error(`creation: ${created.statusCode}`);
  const url = new URL(created.headers.location, endpoint).toString();
  const statuses = [];
  let offset = 0;
  let spoil = true;
  while (offset < size) {
    const end = Math.min(offset + patchSize, size);
    const res = await patch(url, offset, end, spoil);
    statuses.push(res.statusCode);
    if (spoil) {
      spoil = false;
      continue;
    }
    if (res.statusCode !== 204) throw new Error(`PATCH at ${offset}: ${res.statusCode}`);
    offset = Number(res.headers['upload-offset']);
  }
  const head = await request('HEAD', url, {});
  process.stdout.write(JSON.stringify({
    ok: true, url, statuses, offset: Number(head.headers['upload-offset']),
  }) + '\n');
} catch (e) {
  process.stdout.write(JSON.stringify({ ok: false, error: String(e) }) + '\n');
}
