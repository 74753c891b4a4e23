"""A small application in its own process, for tests that stop it (SIGSTOP) or kill it.

It takes ordinary form uploads the way a plain web application does: POST, multipart/form-data,
the whole body read (Content-Length). Each request is appended to a JSON-lines log: complete or
not, its Idempotency-Key, text fields, and each file part's name, size and SHA-256. Complete
uploads are answered 201 with a JSON summary.

    python3 recorder.py LOG [--delay SECONDS]

It listens on a free loopback port and prints "listening PORT" once ready.
"""

import argparse
import hashlib
import json
import sys
import threading
import time
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()


def parse_form(content_type, body):
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    fields, files = {}, []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is None:
            fields[name] = data.decode()
        else:
            files.append({
                "field": name,
                "filename": filename,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            })
    return fields, files


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = bytearray()
        while len(body) < length:
            piece = self.rfile.read(min(1 << 20, length - len(body)))
            if not piece:
                break
            body.extend(piece)
        record = {
            "path": self.path,
            "complete": len(body) == length,
            "received": len(body),
            "idempotency_key": self.headers.get("Idempotency-Key"),
        }
        if record["complete"]:
            record["fields"], record["files"] = parse_form(
                self.headers.get("Content-Type", ""), bytes(body)
            )
        with LOCK, open(self.server.log, "a") as log:
            log.write(json.dumps(record) + "\n")
        if not record["complete"]:
            return
        time.sleep(self.server.delay)
        answer = json.dumps({"files": record["files"]}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("log")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.log, server.delay = args.log, args.delay
    print("listening", server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
