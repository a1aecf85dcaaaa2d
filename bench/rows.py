"""The rows of the benchmark: ways for a client to reach the upstream, each started and stopped
by a context manager that yields a :class:`RowRun`.

- ``direct``: client -> upstream.
- ``ppbridge``: client -> ``twistd ppforwarder`` -> a private redis-server -> ``twistd ppproxy``
  -> upstream (optionally with bench/delayproxy.py between the proxy and Redis).
- ``ssh -R``: client -> sshd's remote-forward port -> ssh client -> upstream, with our own sshd.
- ``twisted.web floor``: client -> bench/twfloor.py (a bare twisted.web resource answering the
  same files itself): the cost of one request in and out of twisted.web.
- ``relay floor``: client -> bench/relayfloor.py (twisted.web in, the proxy's Agent and pool
  out) -> upstream: HTTP in plus HTTP out in this stack, no bus, no Redis, no crypto.
- ``bus floor``: client -> bench/busfloor.py front -> a private redis-server -> bench/busfloor.py
  back -> upstream: ppbridge's shape (two processes, pub/sub between them, ppbridge's Redis
  connections) with none of ppbridge's own work (no crypto, streams, checks, logs); small
  requests only.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ppbridge.redis_server import RedisServer, free_port
from ppbridge.scaffold import make_keys, write_forwarder_config, write_proxy_config

from children import Child, http_ok, port_open, wait_until
from procstats import PidSource
from pubload import Resp
from upstreams import SMALL_PATH, Upstream

HERE = Path(__file__).resolve().parent
TWISTD = Path(sys.executable).parent / "twistd"
READY_TIMEOUT = 60.0
PROXY_NAME = "bench"
LISTEN = "tcp:{port}:interface=127.0.0.1:backlog=1024"
"""The forwarder's listen setting here, and the floors' (the same backlog)."""


class RowSkipped(Exception):
    """The row cannot run on this machine (a tool is missing); the message says why."""


@dataclass
class RowRun:
    """A started row: the URL a client uses and the processes to measure.

    ``roles`` are the row's own processes (their CPU is the row's cost); ``helpers`` are
    measured alongside for reference but not counted: the upstream, the WAN delay relay.
    """

    name: str
    base_url: str
    roles: dict[str, PidSource]
    helpers: dict[str, PidSource]
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    counters: Callable[[], dict[str, float]] | None = None
    """Cumulative counters of the row (Redis commands and bytes), sampled around each run."""
    ws: bool = True
    """Whether the WebSocket measurements apply (the floors serve no ``/ws``)."""
    transfers: bool = True
    """Whether the big download and upload apply (the bus floor carries one message each way)."""


@contextlib.contextmanager
def direct(upstream: Upstream) -> Iterator[RowRun]:
    """The upstream itself: the ceiling every tunnel is compared with."""
    yield RowRun("direct", upstream.base_url, {}, upstream.roles())


def _wait_ready(url: str, children: list[Child], what: str) -> None:
    """Until ``url`` answers 200, failing early (with logs) if any child exits."""
    for child in children:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited (status {child.proc.returncode}); log:\n{child.log_tail()}")
    try:
        wait_until(lambda: http_ok(url) or not all(c.alive() for c in children), READY_TIMEOUT, what)
    except RuntimeError as err:
        logs = "\n".join(f"--- {c.name}:\n{c.log_tail()}" for c in children)
        raise RuntimeError(f"{err}\n{logs}") from None
    dead = [c for c in children if not c.alive()]
    if dead:
        raise RuntimeError(f"{dead[0].name} exited (status {dead[0].proc.returncode}); log:\n{dead[0].log_tail()}")


def redis_counters(redis: RedisServer) -> dict[str, float]:
    """Calls per Redis command and bytes through Redis so far (INFO commandstats and stats),
    read with the bench's own client (bench/pubload.py), whatever the installed ppbridge's
    ``RedisServer`` offers."""
    with Resp(redis.port, redis.host, redis.password) as client:
        commands, stats = client.info("commandstats"), client.info("stats")
    counters: dict[str, float] = {}
    for key, value in commands.items():
        if key.startswith("cmdstat_"):
            fields = dict(part.split("=", 1) for part in value.split(",") if "=" in part)
            counters[f"redis {key[len('cmdstat_'):].upper()}"] = float(fields.get("calls", 0))
    counters["redis bytes in"] = float(stats.get("total_net_input_bytes", 0))
    counters["redis bytes out"] = float(stats.get("total_net_output_bytes", 0))
    return counters


def ppbridge_keys(folder: Path) -> None:
    """The forwarder's and the proxy's key pairs in ``folder/keys`` (made once per run)."""
    if not (folder / "keys" / "forwarder.key").exists():
        make_keys(folder, ["forwarder", PROXY_NAME])


def private_redis(stack: contextlib.ExitStack, folder: Path) -> tuple[RedisServer, PidSource]:
    """A redis-server of the row's own in ``folder``, stopped with ``stack``, and its pid source."""
    redis = RedisServer(workdir=str(folder))
    redis.start()
    stack.callback(redis.stop)
    pid = redis.pid
    if pid is None:
        raise RuntimeError("redis-server started without a pid")
    return redis, lambda: [pid] if redis.running else []


@contextlib.contextmanager
def ppbridge(upstream: Upstream, folder: Path, delay_ms: float | None = None,
             name: str = "ppbridge", profile_dir: Path | None = None) -> Iterator[RowRun]:
    """Redis, forwarder and proxy as users run them; ``delay_ms`` puts a delay relay between
    the proxy and Redis (each way), for the WAN-shape mode; ``profile_dir`` runs both under
    twistd's cProfile, which saves ``forwarder.pstats`` and ``proxy.pstats`` there at exit."""
    if not TWISTD.exists():
        raise RowSkipped(f"{TWISTD} not found: run 'make install' first")
    folder.mkdir(exist_ok=True)
    ppbridge_keys(folder)
    children: list[Child] = []
    with contextlib.ExitStack() as stack:
        redis, redis_pids = private_redis(stack, folder)
        proxy_redis = redis.url
        roles: dict[str, PidSource] = {}
        helpers = upstream.roles()
        notes: list[str] = []
        if delay_ms is not None:
            delay_port = free_port()
            relay = Child(f"{name}-delayproxy", [sys.executable, str(HERE / "delayproxy.py"), "--port",
                                                  str(delay_port), "--target-port", str(redis.port),
                                                  "--delay-ms", str(delay_ms)], folder)
            stack.callback(relay.stop)
            children.append(relay)
            wait_until(lambda: port_open(delay_port), 15, "the delay proxy", relay)
            proxy_redis = f"redis://127.0.0.1:{delay_port}/0"
            notes.append(f"proxy <-> Redis through bench/delayproxy.py, {delay_ms:g} ms each way")
        port = free_port()
        fconf = write_forwarder_config(folder, redis.url, LISTEN.format(port=port),
                                       {PROXY_NAME: {"path_prefix": "/"}}, admin="")
        pconf = write_proxy_config(folder, PROXY_NAME, proxy_redis, upstream.base_url, admin="")
        for role, conf in (("forwarder", fconf), ("proxy", pconf)):
            tap = "ppforwarder" if role == "forwarder" else "ppproxy"
            profile = [] if profile_dir is None else [
                f"--profile={profile_dir / f'{role}.pstats'}", "--profiler=cprofile", "--savestats"]
            child = Child(f"{name}-{role}", [str(TWISTD), "-n", "--pidfile=", *profile, tap, "--config", str(conf)],
                          folder, cwd=folder)
            stack.callback(child.stop)
            children.append(child)
            roles[role] = child.pids
        roles["redis-server"] = redis_pids
        if delay_ms is not None:
            helpers["delayproxy"] = children[0].pids
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base + SMALL_PATH, [*children, upstream.child], f"a 200 through {name}")
        forwarder = children[-2]
        notes += [f"forwarder {line}" for line in reactor_of(forwarder)]
        yield RowRun(name, base, roles, helpers, notes, counters=lambda: redis_counters(redis))
        # ExitStack stops the children (proxy first), then Redis.


def reactor_of(child: Child) -> list[str]:
    """``["reactor X"]`` from the ``reactor class: X.`` line twistd (and the floors) log at
    start, or nothing: shows the floors run on the forwarder's reactor."""
    try:
        found = re.search(r"reactor class: ([\w.]+?)\.?\s", child.log_path.read_text("utf-8", "replace"))
    except OSError:
        return []
    return [f"reactor {found.group(1)}"] if found else []


@contextlib.contextmanager
def twisted_floor(upstream: Upstream, folder: Path) -> Iterator[RowRun]:
    """bench/twfloor.py: a bare twisted.web resource answering the upstream's two files itself,
    one process, listening as the forwarder does."""
    if upstream.root is None or upstream.uploads is None:
        raise RowSkipped("the upstream has no folder of files to serve")
    folder.mkdir(exist_ok=True)
    port = free_port()
    name = "twisted.web floor"
    with contextlib.ExitStack() as stack:
        child = Child("twfloor", [sys.executable, str(HERE / "twfloor.py"), "--root", str(upstream.root),
                                  "--uploads", str(upstream.uploads), "--listen", LISTEN.format(port=port)], folder)
        stack.callback(child.stop)
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base + SMALL_PATH, [child], f"a 200 from the {name}")
        notes = ["bench/twfloor.py: a bare twisted.web resource (BridgeSite's settings) answering 100 bytes;"
                 " no upstream; uploads are read by twisted.web (into a temp file), counted and dropped",
                 *reactor_of(child)]
        yield RowRun(name, base, {"twisted.web": child.pids}, {}, notes, ws=False)


@contextlib.contextmanager
def relay_floor(upstream: Upstream, folder: Path) -> Iterator[RowRun]:
    """bench/relayfloor.py: twisted.web in, ppbridge.upstreamclient's Agent and pool out, one process."""
    folder.mkdir(exist_ok=True)
    port = free_port()
    name = "relay floor"
    with contextlib.ExitStack() as stack:
        child = Child("relayfloor", [sys.executable, str(HERE / "relayfloor.py"), "--upstream", upstream.base_url,
                                     "--listen", LISTEN.format(port=port)], folder)
        stack.callback(child.stop)
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base + SMALL_PATH, [child, upstream.child], f"a 200 through the {name}")
        notes = ["bench/relayfloor.py: twisted.web in, ppbridge.upstreamclient.Upstream's Agent and pool out, one process;"
                 " no bus, no Redis, no crypto", *reactor_of(child)]
        yield RowRun(name, base, {"relay": child.pids}, upstream.roles(), notes, ws=False)


@contextlib.contextmanager
def bus_floor(upstream: Upstream, folder: Path) -> Iterator[RowRun]:
    """bench/busfloor.py: front (twisted.web, PUBLISH) and back (SUBSCRIBE, the proxy's Agent)
    through a private redis-server, as ppbridge's row has one."""
    folder.mkdir(exist_ok=True)
    port = free_port()
    name = "bus floor"
    with contextlib.ExitStack() as stack:
        redis, redis_pids = private_redis(stack, folder)
        script = str(HERE / "busfloor.py")
        back = Child("busfloor-back", [sys.executable, script, "--role", "back", "--redis", redis.url,
                                       "--upstream", upstream.base_url], folder)
        stack.callback(back.stop)
        front = Child("busfloor-front", [sys.executable, script, "--role", "front", "--redis", redis.url,
                                         "--listen", LISTEN.format(port=port)], folder)
        stack.callback(front.stop)
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base + SMALL_PATH, [front, back, upstream.child], f"a 200 through the {name}")
        notes = ["bench/busfloor.py: twisted.web front and Agent back in two processes, one PUBLISH each way"
                 " through ppbridge's RedisBus; no crypto, streams, checks or logs; small requests only",
                 *reactor_of(front)]
        roles: dict[str, PidSource] = {"front": front.pids, "back": back.pids, "redis-server": redis_pids}
        yield RowRun(name, base, roles, upstream.roles(), notes, counters=lambda: redis_counters(redis),
                     ws=False, transfers=False)


def _ssh_tools() -> tuple[str, str, str]:
    """Absolute paths of sshd, ssh and ssh-keygen; RowSkipped naming what is missing."""
    found = {name: shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)
        for name in ("sshd", "ssh", "ssh-keygen")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise RowSkipped(f"{' and '.join(missing)} not installed (apt-get install openssh-server openssh-client)")
    return found["sshd"] or "", found["ssh"] or "", found["ssh-keygen"] or ""


def _sshd_config(folder: Path, port: int) -> Path:
    conf = folder / "sshd_config"
    conf.write_text(f"""ListenAddress 127.0.0.1:{port}
HostKey {folder}/host_key
PidFile {folder}/sshd.pid
AuthorizedKeysFile {folder}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
AllowTcpForwarding remote
GatewayPorts no
X11Forwarding no
PermitTTY no
PrintMotd no
UseDNS no
LogLevel ERROR
""")
    return conf


def ssh_version(ssh: str) -> str:
    out = subprocess.run([ssh, "-V"], check=False, capture_output=True, text=True, timeout=10)
    return (out.stderr or out.stdout).strip()


@contextlib.contextmanager
def ssh_reverse(upstream: Upstream, folder: Path) -> Iterator[RowRun]:
    """Our own sshd on a free loopback port and ``ssh -N -R`` to it, default ciphers."""
    sshd, ssh, keygen = _ssh_tools()
    folder.mkdir(exist_ok=True)
    for key in ("host_key", "client_key"):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", "ppbridge-bench", "-f", str(folder / key)],
                       check=True, timeout=30, stdin=subprocess.DEVNULL, capture_output=True)
    shutil.copyfile(folder / "client_key.pub", folder / "authorized_keys")
    notes: list[str] = []
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755)  # sshd's privilege-separation chroot (Debian)
        notes.append("created /run/sshd (sshd's privilege-separation directory)")
    sshd_port, remote_port = free_port(), free_port()
    conf = _sshd_config(folder, sshd_port)
    check = subprocess.run([sshd, "-t", "-f", str(conf)], check=False, capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise RowSkipped(f"sshd rejects its config: {check.stderr.strip()}")
    with contextlib.ExitStack() as stack:
        server = Child("sshd", [sshd, "-D", "-e", "-f", str(conf)], folder)
        stack.callback(server.stop)
        wait_until(lambda: port_open(sshd_port), 15, "sshd", server)
        client = Child("ssh", [
            ssh, "-F", "/dev/null", "-N", "-T", "-R", f"{remote_port}:127.0.0.1:{upstream.port}",
            "-p", str(sshd_port), "-i", str(folder / "client_key"), "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", f"UserKnownHostsFile={folder / 'known_hosts'}", "-o", "ExitOnForwardFailure=yes",
            "-o", "LogLevel=ERROR", f"{getpass.getuser()}@127.0.0.1"], folder)
        stack.callback(client.stop)  # runs before server.stop: the session ends first
        base = f"http://127.0.0.1:{remote_port}"
        _wait_ready(base + SMALL_PATH, [server, client, upstream.child], "a 200 through ssh -R")
        roles: dict[str, PidSource] = {"sshd": server.pids, "ssh": client.pids}
        yield RowRun("ssh -R", base, roles, upstream.roles(), notes, {"ssh": ssh_version(ssh)})
