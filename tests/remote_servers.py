"""Servers for the remote-store tests and benchmark, on 127.0.0.1 only: a
plain HTTP file server that honours Range requests (and counts what it
serves), and moto's S3 server."""

from __future__ import annotations

import email.utils
import http.server
import os
import re
import threading
from pathlib import Path
from typing import Any


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD of files under the server's root, with single-range Range
    support, an ETag from size and mtime, 403 for names starting with
    ``denied``, 503 for everything while ``server.failing``. Counts requests and body bytes per path on the server."""

    protocol_version = "HTTP/1.1"
    server: RangeServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _target(self) -> Path | None:
        name = self.path.split("?", 1)[0].lstrip("/")
        if not name or ".." in name.split("/"):
            return None
        return self.server.root / name

    def _headers(self, path: Path) -> tuple[int, dict[str, str]]:
        st = path.stat()
        return st.st_size, {
            "ETag": f'"{st.st_size:x}-{st.st_mtime_ns:x}"',
            "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
            "Accept-Ranges": "bytes",
        }

    def _refuse(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, body: bool) -> None:
        path = self._target()
        with self.server.lock:
            self.server.requests.append((self.command, self.path, self.headers.get("Range")))
        if self.server.failing:
            return self._refuse(503)
        if path is not None and path.name.startswith("denied"):
            return self._refuse(403)
        if path is None or not path.is_file():
            return self._refuse(404)
        size, headers = self._headers(path)
        start, end, code = 0, size, 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m:
                return self._refuse(416)
            start = int(m.group(1))
            end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            if start >= end:
                return self._refuse(416)
            code = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if body:
            with open(path, "rb") as f:
                f.seek(start)
                self.wfile.write(f.read(end - start))
            with self.server.lock:
                self.server.bytes_served += end - start

    def do_GET(self) -> None:  # noqa: N802
        self._serve(True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(False)


class RangeServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.root = Path(root)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, str | None]] = []
        self.bytes_served = 0
        self.failing = False
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> RangeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def reset_counts(self) -> None:
        with self.lock:
            self.requests.clear()
            self.bytes_served = 0


def start_moto() -> tuple[Any, str]:
    """(server, endpoint URL) of a moto S3 server on a free loopback port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def s3_options(endpoint: str) -> dict[str, Any]:
    return {"endpoint": endpoint, "access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}


def s3_put(endpoint: str, bucket: str, key: str, data: bytes | os.PathLike[str]) -> None:
    """Create `bucket` (if needed) and put one object, with obstore."""
    import urllib.request

    import obstore
    from obstore.store import S3Store

    req = urllib.request.Request(f"{endpoint}/{bucket}", method="PUT")
    try:
        urllib.request.urlopen(req, timeout=10).close()
    except Exception:  # noqa: BLE001 - exists already
        pass
    store = S3Store(bucket, client_options={"allow_http": True}, **s3_options(endpoint))
    payload = Path(data).read_bytes() if isinstance(data, os.PathLike) else data
    obstore.put(store, key, payload)
