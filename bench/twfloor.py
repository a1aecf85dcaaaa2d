"""The ``twisted.web floor`` row: a bare twisted.web resource, what one HTTP request answered
by this stack costs with nothing of ppbridge's in it.

``python bench/twfloor.py --root DIR --listen ENDPOINT`` serves, from one process on the
reactor twistd installs (the platform default, epoll on Linux):

- ``/small.txt``: DIR's 100-byte file, read once at start, answered from memory;
- ``/big.bin``: DIR's big file, streamed with a push producer in 256 KiB writes (the size of
  the frames the forwarder writes), so memory stays flat;
- ``PUT /upload.bin``: the body as twisted.web reads it before any resource sees it (into a
  temporary file above 100 KB), counted and answered 201; the count is recorded as the size of
  a sparse ``--uploads DIR/upload.bin`` (no data written), where the bench checks it as it
  checks nginx's uploads.

The site is set up as the forwarder's ``BridgeSite`` (ppbridge/webface.py): a 60 s idle
timeout, no multipart form parsing, not noisy, no access log; ENDPOINT is the forwarder's
listen string (same backlog). :func:`floor_site` is shared with bench/relayfloor.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

SMALL_PATH = b"/small.txt"  # bench/upstreams.py's paths
BIG_PATH = b"/big.bin"
UPLOAD_PATH = b"/upload.bin"
CHUNK = 256 * 1024  # the forwarder's default frame_size: what it writes to a client at a time
SITE_TIMEOUT = 60.0  # BridgeSite's default idle timeout (ppbridge/webface.py)


class QuietSite(Site):
    """A Site as BridgeSite sets one up, without its access log (BridgeSite.log writes nothing)."""

    noisy = False

    def log(self, request: object) -> None:
        return None


def floor_site(resource: Resource) -> Site:
    """``resource`` behind a Site with BridgeSite's settings."""
    make: Any = QuietSite  # twisted.web's Site.__init__ has no annotations
    site: Site = make(resource, timeout=SITE_TIMEOUT, parsePOSTFormSubmission=False)
    return site


def listen(reactor: Any, endpoint: str, site: Site, what: str) -> None:
    """Listen on ``endpoint`` (Twisted syntax, as the forwarder's ``listen`` setting), then
    say on stdout which reactor runs (twistd logs the same ``reactor class:`` line)."""
    from twisted.internet.endpoints import serverFromString
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])  # errors, as twistd -n shows them

    def ready(port: Any) -> None:
        cls = type(reactor)
        print(f"{what} listening on {port.getHost()}; reactor class: {cls.__module__}.{cls.__qualname__}.",
              flush=True)

    def failed(failure: Any) -> None:
        print(f"{what}: cannot listen on {endpoint}: {failure.getErrorMessage()}", flush=True)
        reactor.stop()

    serverFromString(reactor, endpoint).listen(site).addCallbacks(ready, failed)


@implementer(IPushProducer)
class FileBody:
    """A file streamed into a request, ``CHUNK`` bytes per write, paused when the client's
    socket buffer is full (twisted.web passes the transport's pause on to its producer)."""

    def __init__(self, request: Any, path: Path) -> None:
        self.request = request
        self.file = open(path, "rb")  # noqa: SIM115 (closed by _close)
        self.paused = False
        self.done = False
        request.setHeader(b"content-length", b"%d" % os.fstat(self.file.fileno()).st_size)
        request.notifyFinish().addBoth(self._close)
        request.registerProducer(self, True)
        self._pump()

    def _pump(self) -> None:
        while not self.paused and not self.done:
            data = self.file.read(CHUNK)
            if not data:
                self.done = True
                self.request.unregisterProducer()
                self.request.finish()
                return
            self.request.write(data)

    def _close(self, result: object) -> None:
        self.done = True
        self.file.close()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._pump()

    def stopProducing(self) -> None:
        self.done = True


class Floor(Resource):
    """Every path: the small body from memory, the big file streamed, else 404."""

    isLeaf = True

    def __init__(self, root: Path, uploads: Path) -> None:
        super().__init__()
        self.small = (root / SMALL_PATH.decode().lstrip("/")).read_bytes()
        self.big = root / BIG_PATH.decode().lstrip("/")
        self.upload_record = uploads / UPLOAD_PATH.decode().lstrip("/")

    def render_GET(self, request: Any) -> Any:
        if request.path == SMALL_PATH:
            return self.small
        if request.path == BIG_PATH:
            FileBody(request, self.big)
            return NOT_DONE_YET
        request.setResponseCode(404)
        return b"not found\n"

    def render_PUT(self, request: Any) -> bytes:
        if request.path != UPLOAD_PATH:
            request.setResponseCode(405)
            return b"PUT only to /upload.bin\n"
        received = request.content.seek(0, os.SEEK_END)
        with open(self.upload_record, "wb") as record:
            record.truncate(received)  # sparse: the count, not the bytes
        request.setResponseCode(201)
        return b""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="folder with small.txt and big.bin")
    parser.add_argument("--uploads", type=Path, required=True, help="folder where an upload's size is recorded")
    parser.add_argument("--listen", required=True, help="endpoint, e.g. tcp:8080:interface=127.0.0.1:backlog=1024")
    args = parser.parse_args()

    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    listen(reactor, args.listen, floor_site(Floor(args.root, args.uploads)), "twisted.web floor")
    reactor.run()


if __name__ == "__main__":
    main()
