// The tus server that benches/tus.rs compares Stitch's tus route with: @tus/server and
// @tus/file-store as their README sets them up, uploads at /files, stored in the directory
// given as the only argument. Listens on 127.0.0.1 at a port the system picks and prints
// `listening <port>` once it accepts connections.
import http from 'node:http';
import { FileStore } from '@tus/file-store';
import { Server } from '@tus/server';

const directory = process.argv[2];
if (!directory) {
  console.error('usage: node server.mjs <storage directory>');
  process.exit(2);
}
const tus = new Server({ path: '/files', datastore: new FileStore({ directory }) });
const server = http.createServer((req, res) => tus.handle(req, res));
server.listen(0, '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
