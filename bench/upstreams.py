"""The fast upstream every row calls: nginx when installed, else a Twisted static server.

Both serve the same two files from a folder in the run's temp dir: ``/small.txt`` (a 100-byte
body) and ``/big.bin`` (64 MiB of random bytes by default), and take uploads: a ``PUT`` of
``/upload.bin`` is read whole and written to ``upload.bin`` in a folder of its own (nginx's DAV
module, which answers only after the last byte is in), so the bench can check by the file's size
that every byte arrived. With nginx, ``/ws`` is also
proxied (HTTP/1.1, ``Upgrade``/``Connection`` passed on) to bench/wsecho.py, a WebSocket echo
server, so every row reaches WebSocket through the same base URL and the same extra hop.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ppbridge.redis_server import free_port

from children import Child, http_ok, port_open, wait_until
from procstats import PidSource

SMALL_PATH = "/small.txt"
BIG_PATH = "/big.bin"
WS_PATH = "/ws"
UPLOAD_PATH = "/upload.bin"
SMALL_SIZE = 100
START_TIMEOUT = 15.0
HERE = Path(__file__).resolve().parent


@dataclass
class Upstream:
    """A running upstream: what it is, where it listens, its process."""

    kind: str
    port: int
    child: Child
    big_size: int
    notes: list[str] = field(default_factory=list)
    ws_child: Child | None = None
    """bench/wsecho.py, when ``/ws`` is served (nginx only)."""
    ws_skipped: str = ""
    """Why there is no ``/ws`` (empty when there is)."""
    root: Path | None = None
    """The folder with the two files (the twisted.web floor serves the same ones)."""
    uploads: Path | None = None
    """The folder an upload of :data:`UPLOAD_PATH` is written to."""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def roles(self) -> dict[str, PidSource]:
        return {"nginx" if self.kind.startswith("nginx") else "upstream": self.child.pids}

    def upload_received(self) -> int:
        """Bytes of the last upload the upstream wrote out (-1: none since :meth:`upload_reset`)."""
        try:
            return (self.uploads or Path("/nonexistent")).joinpath(UPLOAD_PATH.lstrip("/")).stat().st_size
        except FileNotFoundError:
            return -1

    def upload_reset(self) -> None:
        """Forget the last upload, so the next check sees only the next one."""
        (self.uploads or Path("/nonexistent")).joinpath(UPLOAD_PATH.lstrip("/")).unlink(missing_ok=True)

    def ws_roles(self) -> dict[str, PidSource]:
        """The processes a WebSocket message passes through upstream: nginx and the echo server."""
        return {**self.roles(), **({"wsecho": self.ws_child.pids} if self.ws_child else {})}


def _write_files(www: Path, big_size: int) -> None:
    """The two bodies; the folder is world-readable so nginx workers (www-data) can read it."""
    www.mkdir(mode=0o755)
    os.chmod(www, 0o755)
    (www / SMALL_PATH.lstrip("/")).write_bytes(b"x" * (SMALL_SIZE - 1) + b"\n")
    with open(www / BIG_PATH.lstrip("/"), "wb") as f:
        remaining = big_size
        while remaining > 0:
            chunk = min(remaining, 1 << 20)
            f.write(os.urandom(chunk))
            remaining -= chunk
    for name in (SMALL_PATH, BIG_PATH):
        os.chmod(www / name.lstrip("/"), 0o644)


def nginx_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], check=False, capture_output=True, text=True, timeout=10)
    return (out.stderr or out.stdout).strip().replace("nginx version: ", "")


def _nginx_config(tmp: Path, www: Path, port: int, ws_port: int | None = None, uploads: Path | None = None) -> Path:
    """A self-contained nginx.conf: one worker, no access log, every path in ``tmp``; with
    ``ws_port``, ``/ws`` proxied to the WebSocket echo server there (upgrade passed on); with
    ``uploads``, a ``PUT`` of :data:`UPLOAD_PATH` written there by the DAV module, which reads
    the whole body (into a temp file, renamed into place) before it answers 201."""
    temp = tmp / "nginx-temp"
    temp.mkdir()
    paths = {name: temp / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    ws = "" if ws_port is None else f"""
        location = {WS_PATH} {{
            proxy_pass http://127.0.0.1:{ws_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_buffer_size 64k;  # the relay buffer of each direction once upgraded
            proxy_buffers 4 64k;
            proxy_busy_buffers_size 64k;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}"""
    upload = "" if uploads is None else f"""
        location = {UPLOAD_PATH} {{
            root {uploads};
            dav_methods PUT;
            client_max_body_size 0;
        }}"""
    conf = tmp / "nginx.conf"
    conf.write_text(f"""daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 100000000;
    default_type application/octet-stream;
    client_body_temp_path {paths["client_body"]};
    proxy_temp_path {paths["proxy"]};
    fastcgi_temp_path {paths["fastcgi"]};
    uwsgi_temp_path {paths["uwsgi"]};
    scgi_temp_path {paths["scgi"]};
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        root {www};
        location / {{ }}{ws}{upload}
    }}
}}
""")
    return conf


@contextlib.contextmanager
def start_upstream(tmp: Path, big_size: int, allow_nginx: bool = True, ws: bool = True) -> Iterator[Upstream]:
    """Start nginx (if installed and allowed) or the Twisted static server, and with nginx
    (and ``ws``) the WebSocket echo server behind its ``/ws``; stop them on exit."""
    www = tmp / "www"
    _write_files(www, big_size)
    uploads = tmp / "uploads"
    uploads.mkdir()
    os.chmod(uploads, 0o777)  # nginx workers (another user) write the uploads here
    port = free_port()
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    notes: list[str] = []
    ws_child: Child | None = None
    ws_skipped = "" if ws else "--no-ws"
    with contextlib.ExitStack() as stack:
        if nginx and allow_nginx:
            ws_port = None
            if ws:
                ws_child, ws_port, ws_skipped = _start_wsecho(tmp)
                if ws_child is not None:
                    stack.callback(ws_child.stop)  # after nginx's stop (callbacks run last in, first out)
            conf = _nginx_config(tmp, www, port, ws_port, uploads)
            child = Child("nginx", [nginx, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "nginx-error.log")],
                          tmp)
            kind = f"nginx {nginx_version(nginx)} (1 worker, sendfile)"
        else:
            notes.append("nginx not installed: upstream is bench/staticserver.py (twisted.web.static)"
                         if not nginx else "nginx disabled (--no-nginx): upstream is bench/staticserver.py")
            child = Child("staticserver", [sys.executable, str(HERE / "staticserver.py"), "--root", str(www),
                                           "--uploads", str(uploads), "--port", str(port)], tmp)
            kind = "twisted.web.static (bench/staticserver.py)"
            if ws:
                ws_skipped = "no nginx: the Twisted static upstream does not pass /ws on to the echo server"
        stack.callback(child.stop)
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}{SMALL_PATH}"), START_TIMEOUT, "the upstream", child)
        yield Upstream(kind, port, child, big_size, notes, ws_child, ws_skipped, www, uploads)


def _start_wsecho(tmp: Path) -> tuple[Child | None, int | None, str]:
    """bench/wsecho.py on a free port: (child, port, "") or (None, None, why not)."""
    port = free_port()
    child = Child("wsecho", [sys.executable, str(HERE / "wsecho.py"), "--port", str(port)], tmp)
    try:
        wait_until(lambda: port_open(port), START_TIMEOUT, "the WebSocket echo server", child)
    except RuntimeError as err:
        child.stop()
        return None, None, f"bench/wsecho.py did not start: {str(err).splitlines()[0]} {child.log_tail(3)}"
    return child, port, ""
