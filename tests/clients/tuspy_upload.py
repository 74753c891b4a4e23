"""tuspy (PyPI's tus client) uploading one file to a tus endpoint, then asking the upload's URL
for the application's answer (GET; Stitch answers 202 while the delivery is under way).

    python3 tuspy_upload.py '{"endpoint": URL, "file": PATH, "filename": NAME,
                             "filetype": TYPE, "chunk_size": N?, "checksum": BOOL?,
                             "async": BOOL?}'

chunk_size: bytes a PATCH (default: tuspy's, the whole file in one PATCH); checksum: send
Upload-Checksum (sha1) with every PATCH; async: tuspy's AsyncUploader (aiohttp) instead of
the Uploader (requests). Prints one JSON line:
    {"ok": …, "error": …, "url": …, "patches": N, "answer": {"status": …, "body": …}}
"""

import asyncio
import json
import sys
import time

import requests
import tusclient.request
from tusclient import client


def main():
    args = json.loads(sys.argv[1])
    result = {"ok": False, "error": None, "url": None, "patches": 0, "answer": None}
    count_patches(result)
    options = {
        "file_path": args["file"],
        "metadata": {"filename": args["filename"], "filetype": args["filetype"]},
        "upload_checksum": bool(args.get("checksum")),
    }
    if args.get("chunk_size"):
        options["chunk_size"] = args["chunk_size"]
    tus = client.TusClient(args["endpoint"])
    try:
        if args.get("async"):
            uploader = tus.async_uploader(**options)
            asyncio.run(uploader.upload())
        else:
            uploader = tus.uploader(**options)
            uploader.upload()
        result["url"] = uploader.url
        result["ok"] = True
        result["answer"] = answer_of(uploader.url)
    except Exception as error:  # the test reports whatever went wrong
        result["error"] = f"{type(error).__name__}: {error}"
    print(json.dumps(result), flush=True)


def count_patches(result):
    """Counts the PATCH requests of the requests-based Uploader and of the AsyncUploader."""
    patch = tusclient.request.requests.patch

    def counted(*args, **kwargs):
        result["patches"] += 1
        return patch(*args, **kwargs)

    tusclient.request.requests.patch = counted
    perform = tusclient.request.AsyncTusRequest.perform

    async def counted_async(self):
        result["patches"] += 1
        return await perform(self)

    tusclient.request.AsyncTusRequest.perform = counted_async


def answer_of(url):
    """The application's answer: GET on the upload's URL until it is no longer 202."""
    for _ in range(100):
        response = requests.get(url, timeout=30)
        if response.status_code != 202:
            return {"status": response.status_code, "body": response.text}
        time.sleep(0.3)
    return {"status": 202, "body": "still pending after 100 tries"}


if __name__ == "__main__":
    main()
