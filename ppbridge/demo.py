"""``ppbridge demo``: the whole chain on one machine, to see it work in a minute.

Starts a private redis-server, makes keys and configs in a temporary folder, runs a sample
intranet service, a proxy and a forwarder in this process, prints the URL to open and a curl
line, and serves until Ctrl-C. On exit everything it started is stopped and the folder removed.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint

from ppbridge.config import load_forwarder_config, load_proxy_config
from ppbridge.redis_server import RedisNotFound, RedisServer, redis_server_origin
from ppbridge.scaffold import make_keys, write_forwarder_config, write_proxy_config

PROXY = "intranet"


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


@defer.inlineCallbacks
def _start(reactor: Any, folder: Path, redis: RedisServer, port: int, stoppers: list[Any]):  # type: ignore[no-untyped-def]
    from ppbridge.bus import RedisBus
    from ppbridge.forwarder import ForwarderService
    from ppbridge.proxy import ProxyService
    from ppbridge.sampleapp import make_site
    from ppbridge.webface import BridgeSite

    app_site, _ = make_site()
    app_port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(app_site)
    stoppers.append(app_port.stopListening)
    upstream = f"http://127.0.0.1:{app_port.getHost().port}"
    _say(f"  sample intranet service on {upstream} (reachable only from this machine)")

    fconf = write_forwarder_config(folder, redis.url, f"tcp:{port}:interface=127.0.0.1", {PROXY: {"path_prefix": "/"}})
    pconf = write_proxy_config(folder, PROXY, redis.url, upstream)
    forwarder = ForwarderService(load_forwarder_config(fconf), RedisBus(load_forwarder_config(fconf).redis, reactor), reactor)
    proxy_settings = load_proxy_config(pconf)
    proxy = ProxyService(proxy_settings, RedisBus(proxy_settings.redis, reactor), reactor, reactor)
    for service in (forwarder, proxy):
        service.startService()
        stoppers.append(service.stopService)
    web = yield TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(BridgeSite(forwarder))
    stoppers.append(web.stopListening)
    yield forwarder.wait_for_proxy(PROXY).addTimeout(30, reactor)
    url = f"http://127.0.0.1:{port}/"
    _say(f"\nppbridge is up. Keys and configs: {folder}")
    _say(f"  open   {url}")
    _say(f"  or     curl -i {url}echo?hello=world")
    _say("  every request went: curl -> forwarder -> Redis (ciphertext only) -> proxy -> intranet service")
    _say("Ctrl-C stops everything.")


def run(port: int | None = None) -> int:
    """Run the demo until interrupted; the process exit code."""
    from twisted.internet import reactor

    try:
        redis = RedisServer()
        redis.start()
    except RedisNotFound as err:
        _say(f"ppbridge demo: {err}")
        return 1
    folder = Path(tempfile.mkdtemp(prefix="ppbridge-demo-"))
    stoppers: list[Any] = []
    _say(f"ppbridge demo: Redis on {redis.url} (private to this demo)")
    _say(f"  redis-server: {redis.binary} ({redis_server_origin(redis.binary)})")
    _say("  generating keys (RSA-3072) ...")
    make_keys(folder, ["forwarder", PROXY])
    outcome: list[int] = [0]

    def failed(failure: Any) -> None:
        _say(f"ppbridge demo: could not start: {failure.getErrorMessage()}")
        outcome[0] = 1
        reactor.stop()

    @defer.inlineCallbacks
    def shutdown():  # type: ignore[no-untyped-def]
        for stop in reversed(stoppers):
            try:
                yield stop()
            except Exception:
                pass

    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    reactor.callWhenRunning(lambda: _start(reactor, folder, redis, port or 8080, stoppers).addErrback(failed))
    try:
        reactor.run()
    finally:
        redis.stop()
        shutil.rmtree(folder, ignore_errors=True)
        _say("ppbridge demo: stopped; nothing left running.")
    return outcome[0]



