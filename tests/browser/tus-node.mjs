// tus-js-client 4.x in Node, as Wix documents its resumable upload API: a tus.Upload of an
// fs.ReadStream with retryDelays and metadata { filename, contentType, token }, then
// axios.put(endpoint + '/' + token, {}, { params: { filename } }) to finalize.
//
// Usage: node tus-node.mjs '<json>' with
//   { endpoint, file, filename, contentType, token,
//     chunkSize?      (default: none, one PATCH for the whole file, as Wix's sample has it),
//     parallelUploads? (default: none; N partial uploads, concatenated by a final one: the
//                      file is read into a Buffer, which tus-js-client can slice),
//     finalize?       (default true),
//     progress?       (print "progress <sent> <total>" lines as the upload goes),
//     buffer?         (read the file into a Buffer instead of streaming it),
//     options?        (more tus.Upload options, as they are) }
// Prints one JSON line at the end: { ok, error, url, finalize: { status, data } }.
import fs from 'node:fs';
import * as tus from 'tus-js-client';
import axios from 'axios';

const args = JSON.parse(process.argv[2]);
const { endpoint, file, filename, contentType, token } = args;

function upload() {
  return new Promise((resolve, reject) => {
    const options = {
      endpoint,
      retryDelays: [0, 3000, 5000, 10000, 20000],
      metadata: { filename, contentType, token },
      onError: reject,
      onProgress: (sent, total) => {
        if (args.progress) process.stdout.write(`progress ${sent} ${total}\n`);
      },
      onSuccess: () => resolve(upload.url),
    };
    if (args.chunkSize) options.chunkSize = args.chunkSize;
    if (args.parallelUploads) options.parallelUploads = args.parallelUploads;
    Object.assign(options, args.options || {});
    const source = args.parallelUploads || args.buffer
      ? fs.readFileSync(file)
      : fs.createReadStream(file);
    const upload = new tus.Upload(source, options);
    upload.start();
  });
}

const result = { ok: false, error: null, url: null, finalize: null };
try {
  result.url = await upload();
  result.ok = true;
  if (args.finalize !== false) {
    const response = await axios.put(endpoint + '/' + token, {}, {
      params: { filename },
      validateStatus: () => true,
      responseType: 'text',
      transformResponse: (data) => data,
    });
    result.finalize = { status: response.status, data: response.data };
  }
} catch (e) {
  result.error = String(e && e.message ? e.message : e);
}
process.stdout.write(JSON.stringify(result) + '\n');
