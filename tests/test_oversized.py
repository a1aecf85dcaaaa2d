"""A hostile Redis pushes the proxy pub/sub messages far larger than any publisher sends.

Redis is untrusted: whoever sits between a proxy and its Redis can push the proxy's subscriber
connection a message of any size. txredisapi's reader buffers a bulk string whole before
anything can look at its size, so without the streaming guard (ppbridge/respguard.py) one
1 GiB push costs the proxy over 2 GB of memory. Here the proxy is a real ``twistd -n ppproxy``
child process whose only Redis is a HostileRedis (tests/hostile.py) in front of a real
``redis-server``; the forwarder, also a ``twistd -n`` child, talks to that Redis directly, and
the sample upstream runs in the test process.
"""

from __future__ import annotations

import json
import re

from twisted.internet import defer, reactor
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from ppbridge.channels import Channels
from ppbridge.redis_server import free_port
from ppbridge.sampleapp import make_site
from ppbridge.scaffold import write_forwarder_config, write_proxy_config
from tests.hostile import HostileRedis
from tests.processes import ERR, OUT, TWISTD, Child, spawn
from tests.support import Client, key_pair, listen, start_redis, temp_folder

ROUTES = {"alpha": {"path_prefix": "/"}}
CONFIRMED = r"proxy alpha \(instance ([0-9a-f]+)\) confirmed key"
PROXY_KEYED = r"key \S+ from forwarder"
PROXY_STARTED = r"proxy alpha \(instance ([0-9a-f]+)\) calling"
DATA_PUSH = 1 << 30  # 1 GiB on the proxy's data channel (its limit: one frame, about 256 KiB)
ANNOUNCE_PUSH = 1 << 20  # 1 MiB on ppbridge:announce (its limit: 64 KiB)
PEAK_RSS_LIMIT = 150 * 1000 * 1000  # the bound; before the guard the proxy reached 2.1 GB
PUSH_TIMEOUT = 40.0  # seconds for the 1 GiB to be written through the proxy's TCP window
REQUEST_LIMIT = 10.0
log = Logger()  # the numbers go to the test log (_trial_temp/test.log under trial)


def memory_of(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of a live process, in bytes."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                number, unit = value.split()
                assert unit == "kB", line
                found[name] = int(number) * 1024
    return found


def drop_line(channel: bytes, size: int | None = None) -> str:
    """The proxy's DropLog line (ppbridge/node.py) for a message dropped on ``channel``: as
    oversized, ``size`` bytes, or for any reason (group 1) when ``size`` is None."""
    reason = f"oversized: {size} bytes" if size is not None else "(.*)"
    return rf"proxy: dropped a bus message on {re.escape(channel.decode())}: {reason}$"


def describe(*children: Child) -> str:
    """The children's last output lines, for failure messages."""
    return "\n".join(child.describe() for child in children)


class HugeBusMessages(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_huge_bus_messages_are_not_buffered(self):
        """The attacker owns the network between the proxy child and Redis; the forwarder child
        uses Redis directly. Once the proxy is keyed and has served a request through the
        attacker, the attacker pushes the proxy's subscriber connection a 1 GiB message on its
        data channel (ppbridge:p:alpha:<instance>, limit about 256 KiB), streamed as fast as the
        proxy reads, then a 1 MiB message on ppbridge:announce (limit 64 KiB). Once both are
        written and the proxy has read them (it logs the second one's drop), the proxy must
        show: a peak RSS (VmHWM) under 150 MB; exactly two "dropped a bus message ... oversized"
        log lines, one per push, naming its channel and size; the same process, with no refused
        reply, no Redis disconnect and no unhandled error logged, its two connections through
        the attacker still open; and a request through the forwarder answered 200."""
        folder = temp_folder(self)
        run_dir = temp_folder(self)  # the children's cwd: neither the repo nor the configs
        redis = start_redis(self)
        hostile = yield HostileRedis(redis.host, redis.port).start()
        self.addCleanup(hostile.stop)
        key_pair(folder, "forwarder")
        key_pair(folder, "alpha")
        site, _app = make_site()
        upstream = yield listen(self, site)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        fconf = write_forwarder_config(folder, redis.url, f"tcp:{port}:interface=127.0.0.1", ROUTES)
        pconf = write_proxy_config(folder, "alpha", hostile.url, upstream)
        forwarder = spawn(self, run_dir, [TWISTD, "-n", "--pidfile=", "ppforwarder", "--config", str(fconf)],
                          "forwarder")
        proxy = spawn(self, run_dir, [TWISTD, "-n", "--pidfile=", "ppproxy", "--config", str(pconf)], "proxy")
        yield forwarder.wait_for(CONFIRMED)
        yield proxy.wait_for(PROXY_KEYED)
        instance = (yield proxy.wait_for(PROXY_STARTED, timeout=1)).group(1)
        pid = proxy.transport.pid
        client = Client(self)
        response, body = yield client.fetch(b"GET", url + "/echo?before").addTimeout(REQUEST_LIMIT, reactor)
        self.assertEqual(response.code, 200, body)
        self.assertEqual(hostile.connections(), 3,
                         "the proxy's publisher, subscriber and public subscriber, through the attacker")
        before = memory_of(pid)
        since = len(proxy.lines[OUT]), len(proxy.lines[ERR])

        channels = Channels("ppbridge")
        data_channel = channels.proxy_data("alpha", bytes.fromhex(instance))
        start = reactor.seconds()
        yield hostile.send_oversized(data_channel, DATA_PUSH).addTimeout(PUSH_TIMEOUT, reactor)
        took = reactor.seconds() - start
        yield hostile.send_oversized(channels.announce, ANNOUNCE_PUSH).addTimeout(REQUEST_LIMIT, reactor)
        yield proxy.wait_for(drop_line(data_channel, DATA_PUSH), timeout=REQUEST_LIMIT)
        # The second push follows the first one's last byte on the same connection: once the
        # proxy has dropped it (for whatever reason) it has read all of the 1 GiB.
        announce = yield proxy.wait_for(drop_line(channels.announce), timeout=REQUEST_LIMIT)
        after = memory_of(pid)
        log.info("proxy memory: before the pushes {before}, after {after}; 1 GiB written in {took:.1f} s",
                 before=before, after=after, took=took)
        self.assertLess(after["VmHWM"], PEAK_RSS_LIMIT,
                        f"peak RSS {after['VmHWM'] / 1e6:.0f} MB (before the pushes {before['VmHWM'] / 1e6:.0f} MB)"
                        f"\n{describe(proxy)}")
        self.assertEqual(announce.group(1), f"oversized: {ANNOUNCE_PUSH} bytes", describe(proxy))

        response, body = yield client.fetch(b"POST", url + "/echo?after", body=b"x" * 100_000).addTimeout(
            REQUEST_LIMIT, reactor)
        self.assertEqual(response.code, 200, describe(forwarder, proxy))
        self.assertEqual(json.loads(body)["body_length"], 100_000)
        self.assertFalse(proxy.ended, describe(proxy))
        self.assertEqual(proxy.transport.pid, pid)
        self.assertEqual(hostile.connections(), 3, "the proxy's connections through the attacker stayed open")
        output = "\n".join(proxy.lines[OUT][since[0]:] + proxy.lines[ERR][since[1]:])
        self.assertEqual(output.count("dropped a bus message"), 2, describe(proxy))
        for sign in ("refusing the server's reply", "Redis disconnected", "Unhandled error", "Traceback"):
            self.assertNotIn(sign, output, describe(proxy))
