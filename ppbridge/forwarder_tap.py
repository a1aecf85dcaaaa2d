"""``twistd ppforwarder``: wires a ForwarderService from a config file. Nothing else."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from ppbridge import gctune, malloctune
from ppbridge.config import load_forwarder_config
from ppbridge.tap import BaseOptions, Listener, add_admin, add_reload


class Options(BaseOptions):
    synopsis = "--config FILE [--listen ENDPOINT ...] [--redis URL] [--admin ENDPOINT]"
    longdesc = ("The public side of ppbridge: serves HTTP and carries requests to proxies over Redis. "
                "Start from the commented example that `ppbridge example-config forwarder` prints. "
                "Two services started from one folder need a pidfile each, or none: give twistd "
                "--pidfile=FILE or --pidfile= before the command name (`twistd -n --pidfile= ppforwarder ...`).")
    loader = staticmethod(load_forwarder_config)
    program = "ppforwarder"
    overrides_map = {**BaseOptions.overrides_map, "listen": "forwarder.listen"}

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """HTTP endpoint (Twisted syntax: tcp:8080, ssl:8443:privateKey=...); repeatable."""
        self["listen"].append(endpoint)


def makeService(options: Any) -> IService:
    from twisted.internet import reactor

    from ppbridge.bus import RedisBus
    from ppbridge.clientcert import configured_authorities, requesting_reactor
    from ppbridge.forwarder import ForwarderService
    from ppbridge.textlog import offer
    from ppbridge.webface import BridgeSite

    class TwistdForwarder(ForwarderService):
        """The forwarder as twistd runs it: the application it joins gets ppbridge's text log
        observer (the same lines as twistd's default, for less CPU; see ppbridge.textlog)."""

        def setServiceParent(self, parent: Any) -> None:
            super().setServiceParent(parent)
            offer(parent, getattr(options, "parent", None))

    settings = options["settings"]
    service = TwistdForwarder(settings, RedisBus(settings.redis, reactor), reactor)
    site = BridgeSite(service)
    # ssl: endpoints ask for client certificates while an access table has client_ca_file
    listening = requesting_reactor(reactor, lambda: configured_authorities(service.settings))
    for endpoint in settings.listen:
        listener = Listener(endpoint, site, listening, "forwarder.listen", reuse_port=settings.reuse_port)
        listener.setServiceParent(service)
        service.listeners.append(listener)
    add_admin(service, settings.admin_listen, service, reactor)
    add_reload(service, options, service.reload, reactor)
    reactor.callWhenRunning(gctune.tune)  # once started: what exists then lives as long as the process
    reactor.callWhenRunning(malloctune.tune)  # frame-sized buffers stay in the heap
    return service
