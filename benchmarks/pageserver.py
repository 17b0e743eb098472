"""The small local page every benchmark session loads, served outside the measured processes.

Binds 127.0.0.1:0 and prints `PORT=<n>`; stopped by SIGTERM from the harness.
"""

from __future__ import annotations

import http.server
import signal
import sys

PAGE = (
    b"<!doctype html><html><head><title>Bench page</title></head><body>"
    b"<h1>stickyproxy benchmark</h1><ul>"
    + b"".join(b'<li class="item">item %d</li>' % i for i in range(20))
    + b"</ul><p id='done'>ok</p></body></html>"
)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        if self.path.split("?")[0] in ("/page.html", "/"):
            body, ctype, code = PAGE, "text/html; charset=utf-8", 200
        else:
            body, ctype, code = b"not found", "text/plain", 404
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def main() -> None:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"PORT={srv.server_address[1]}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
