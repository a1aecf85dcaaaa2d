"""``twistd ppproxy``: wires a ProxyService from a config file. Nothing else."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from ppbridge import gctune, malloctune
from ppbridge.config import load_proxy_config
from ppbridge.tap import BaseOptions, add_admin, add_reload


class Options(BaseOptions):
    synopsis = "--config FILE [--redis URL] [--upstream URL] [--admin ENDPOINT]"
    longdesc = ("The private side of ppbridge: takes requests off Redis and calls its upstream service. "
                "Start from the commented example that `ppbridge example-config proxy` prints. "
                "Two services started from one folder need a pidfile each, or none: give twistd "
                "--pidfile=FILE or --pidfile= before the command name (`twistd -n --pidfile= ppproxy ...`).")
    loader = staticmethod(load_proxy_config)
    program = "ppproxy"
    optParameters = BaseOptions.optParameters + [
        ["upstream", None, None, "Upstream base URL, overriding [proxy] upstream."],
    ]
    overrides_map = {**BaseOptions.overrides_map, "upstream": "proxy.upstream"}


def makeService(options: Any) -> IService:
    from twisted.internet import reactor

    from ppbridge.bus import RedisBus
    from ppbridge.proxy import ProxyService

    settings = options["settings"]
    service = ProxyService(settings, RedisBus(settings.redis, reactor), reactor, reactor)
    add_admin(service, settings.admin_listen, service, reactor)
    add_reload(service, options, service.reload, reactor)
    reactor.callWhenRunning(gctune.tune)  # once started: what exists then lives as long as the process
    reactor.callWhenRunning(malloctune.tune)  # frame-sized buffers stay in the heap
    return service
