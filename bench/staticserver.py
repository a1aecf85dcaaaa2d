"""A small static file server on loopback: the benchmark's upstream when nginx is not installed.

``python bench/staticserver.py --root DIR --port PORT`` serves DIR with ``twisted.web.static``
(files stream through a producer, so a 64 MiB file costs no 64 MiB buffer), no access log; a
``PUT`` of ``/upload.bin`` is written to ``--uploads DIR/upload.bin`` (as nginx's DAV module does
for the bench) once twisted.web has read the whole body.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, help="folder to serve")
    parser.add_argument("--uploads", type=Path, required=True, help="folder a PUT of /upload.bin is written to")
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    args = parser.parse_args()

    from twisted.internet import reactor as global_reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site
    from twisted.web.static import File

    class QuietSite(Site):
        def log(self, request: object) -> None:
            return None

    class Upload(Resource):
        isLeaf = True

        def render_PUT(self, request: Any) -> bytes:
            request.content.seek(0)
            with open(args.uploads / "upload.bin", "wb") as out:
                shutil.copyfileobj(request.content, out, 1 << 20)
            request.setResponseCode(201)
            return b""

    reactor: Any = global_reactor
    make_site: Any = QuietSite  # twisted.web's Site.__init__ has no annotations
    root = File(args.root)
    make_upload: Any = Upload  # nor has Resource.__init__
    root.putChild(b"upload.bin", make_upload())
    site = make_site(root)
    reactor.listenTCP(args.port, site, backlog=1024, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
