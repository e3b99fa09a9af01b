"""A tiny HTTP client for test_privacy's `serve` test, run as its own process (the test process blocks connects).

    python serve_client.py BASE_URL DICOM BAD_DICOM OUT.json

Waits for /v1/health, POSTs DICOM to /v1/ask (with report=true), fetches the report, POSTs BAD_DICOM, and writes
[[status, body], ...] to OUT.json.
"""

import json
import sys
import time
import urllib.error
import urllib.request
import uuid


def post(base: str, path: str, fields, files):
    boundary = uuid.uuid4().hex
    body = b""
    for key, value in fields:
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
    for key, name, data in files:
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"; filename="{name}"\r\n'
                 "Content-Type: application/dicom\r\n\r\n").encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(base + path, data=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def main() -> None:
    base, dicom, bad, out = sys.argv[1:5]
    for _ in range(900):
        try:
            urllib.request.urlopen(base + "/v1/health", timeout=2).read()
            break
        except (OSError, urllib.error.URLError):
            time.sleep(0.2)
    results = []
    status, headers, body = post(base, "/v1/ask", [
        ("question", "Which code fits?"), ("options", "A. I60.9"), ("options", "B. I63.9"), ("report", "true"),
        ("settings", json.dumps({"max_tokens": 16}))], [("image", "ct-multi.dcm", open(dicom, "rb").read())])
    results.append([status, body.decode("utf-8", "replace")])
    report_url = {k.lower(): v for k, v in headers.items()}.get("x-report-url")
    if report_url:
        results.append([0, urllib.request.urlopen(base + report_url, timeout=60).read().decode("utf-8", "replace")])
    status, headers, body = post(base, "/v1/ask", [("question", "Which code fits?")],
                                 [("image", "ct-bad.dcm", open(bad, "rb").read())])
    results.append([status, body.decode("utf-8", "replace")])
    with open(out, "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
