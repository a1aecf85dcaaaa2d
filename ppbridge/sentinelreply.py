"""What sentinels and the servers behind them say, parsed and checked before use.

Every value a sentinel sends (the master's address, a ``+switch-master`` message) is
checked by type, length and pattern (ValueError otherwise); a server's role is read from
``ROLE``, else ``INFO replication``; a ``-READONLY`` reply means the server is a replica
now. Used by :mod:`ppbridge.sentinel` and :mod:`ppbridge.bus` (through
:mod:`ppbridge.redisconn`).
"""

from __future__ import annotations

import re
from typing import Any

import txredisapi
from twisted.internet import defer

from ppbridge.logsafe import escape

Address = tuple[str, int]
_HOST = re.compile(rb"[A-Za-z0-9.:_-]{1,253}")  # an IPv4 or IPv6 address, or a host name
_PORT = re.compile(rb"[1-9][0-9]{0,4}")


def parse_address(host: object, port: object) -> Address:
    """A host and port a sentinel sent, checked by type, length and pattern (ValueError)."""
    if isinstance(port, int) and not isinstance(port, bool):
        port = b"%d" % port
    if not (isinstance(host, bytes) and _HOST.fullmatch(host)):
        raise ValueError(f"not a host: {escape(host if isinstance(host, bytes) else repr(host), 80)}")
    if not (isinstance(port, bytes) and _PORT.fullmatch(port) and int(port) <= 65535):
        raise ValueError(f"not a port: {escape(port if isinstance(port, bytes) else repr(port), 20)}")
    return host.decode("ascii"), int(port)


def parse_master_reply(reply: object) -> Address | None:
    """``SENTINEL GET-MASTER-ADDR-BY-NAME``'s reply: (host, port), or None for a name the
    sentinel does not know (a nil reply)."""
    if reply is None:
        return None
    if not (isinstance(reply, list) and len(reply) == 2):
        raise ValueError(f"not a (host, port) reply: {escape(repr(reply), 80)}")
    return parse_address(reply[0], reply[1])


def parse_switch(message: object, name: str) -> Address | None:
    """The new master of a ``+switch-master`` message ("<name> <old ip> <old port> <new ip>
    <new port>"), or None when it is about another master name."""
    if not isinstance(message, bytes) or len(message) > 1024:
        raise ValueError("not a +switch-master message")
    fields = message.split(b" ")
    if len(fields) != 5:
        raise ValueError(f"not a +switch-master message: {escape(message, 80)}")
    if fields[0] != name.encode("utf-8"):
        return None
    return parse_address(fields[3], fields[4])


def is_readonly(reply: object) -> bool:
    """Whether ``reply`` is a ``-READONLY`` error: the server is a replica now."""
    if not isinstance(reply, txredisapi.ResponseError) or not reply.args:
        return False
    text = reply.args[0]
    return (text.startswith(b"READONLY") if isinstance(text, bytes)
            else isinstance(text, str) and text.startswith("READONLY"))


@defer.inlineCallbacks
def role_of(proto: Any):  # type: ignore[no-untyped-def]
    """The server's role as it says it (b"master", b"slave", ...): ROLE, else INFO
    replication; None when both are refused (an ACL user without +role and +info)."""
    try:
        reply = yield defer.maybeDeferred(proto.execute_command, b"ROLE")
        if isinstance(reply, list) and reply and isinstance(reply[0], bytes):
            return reply[0]
    except txredisapi.ResponseError:
        pass
    try:
        info = yield defer.maybeDeferred(proto.execute_command, b"INFO", b"replication")
    except txredisapi.ResponseError:
        return None
    for line in info.split(b"\r\n") if isinstance(info, bytes) else ():
        if line.startswith(b"role:"):
            return line[5:]
    return None
