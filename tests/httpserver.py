"""A local HTTP server on 127.0.0.1 for the tests of network code (fetch.py, common.download, twiki.py):
files by URL path, with Range support, reached through HF_ENDPOINT / TGL_TEMPLAMA_URL /
TGL_DYNAMIC_TEMPLAMA_URL. No other host is contacted."""
import hashlib
import io
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

HF = "/datasets/seonghyeonye/TemporalWiki/resolve/main/"  # where fetch.py finds TemporalWiki under HF_ENDPOINT


class Server:
    """Files by URL path, with Range support and an ETag per content. cut[path] = n: the next answer for
    path announces the full length but stops after n bytes (a dropped connection). no_range: ignore Range
    headers. An If-Range that is not the file's ETag sends the whole file (200), unless no_if_range."""

    def __init__(self):
        self.files, self.cut, self.log, self.no_range, self.no_if_range = {}, {}, [], False, False
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                body = owner.files.get(self.path)
                rng = self.headers.get("Range")
                owner.log.append((self.path, rng))
                if body is None:
                    self.send_error(404)
                    return
                start, end, status = 0, len(body) - 1, 200
                etag = f'"{hashlib.sha1(body).hexdigest()[:16]}"'
                if self.headers.get("If-Range", etag) != etag and not owner.no_if_range:
                    rng = None  # the file changed since the client's first part: all of it again
                if rng and not owner.no_range:
                    a, _, b = rng.replace("bytes=", "").partition("-")
                    start, end, status = int(a), int(b) if b else len(body) - 1, 206
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                chunk = body[start:end + 1]
                self.send_response(status)
                self.send_header("Content-Length", str(len(chunk)))
                self.send_header("ETag", etag)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
                self.end_headers()
                n = owner.cut.pop(self.path, len(chunk))
                try:
                    self.wfile.write(chunk[:n])
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server(monkeypatch, tmp_path):
    s = Server()
    monkeypatch.setenv("HF_ENDPOINT", s.url)
    monkeypatch.setenv("TGL_TEMPLAMA_URL", s.url + "/templama")
    monkeypatch.setenv("TGL_DYNAMIC_TEMPLAMA_URL", s.url + "/dyn")
    monkeypatch.setenv("TGL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("time.sleep", lambda s: None)
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def zip_bytes(members: dict, method=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, body in members.items():
            z.writestr(name, body)
    return buf.getvalue()
