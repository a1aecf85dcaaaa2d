"""What both twistd plugins share: options, config loading, listening ports and the admin server."""

from __future__ import annotations

import errno
import sys
from typing import Any, Callable, Mapping

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from ppbridge import reuseport
from ppbridge.admin import Observable, admin_site
from ppbridge.errors import ConfigError
from ppbridge.reload import ReloadOnHangup

log = Logger()


class BaseOptions(usage.Options):
    """``--config FILE`` plus command-line overrides of single config keys."""

    optParameters = [
        ["config", "c", None, "TOML configuration file (`ppbridge example-config forwarder|proxy` prints "
                              "a commented example)."],
        ["redis", None, None, "Redis URL, overriding [redis] url (no password here: use password_file)."],
        ["admin", None, None, "Admin endpoint, overriding [admin] listen (\"\" turns it off)."],
    ]
    loader: Callable[..., Any]
    program = "ppbridge"
    overrides_map: dict[str, str] = {"redis": "redis.url", "admin": "admin.listen"}

    def opt_version(self) -> None:
        """Print ppbridge's version, then Twisted's, and exit."""
        from twisted import copyright

        import ppbridge

        print(f"ppbridge {ppbridge.__version__} ({self.program})")
        print(f"Twisted {copyright.version}")
        sys.exit(0)

    def overrides(self) -> dict[str, object]:
        return {key: self[opt] for opt, key in self.overrides_map.items() if self.get(opt) not in (None, [])}

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        names: Mapping[str, str] = {key: f"--{opt}" for opt, key in self.overrides_map.items()}
        self["option_names"] = names
        try:
            self["settings"] = type(self).loader(self["config"], self.overrides(), names)
        except ConfigError as err:
            # One line, no usage dump and no traceback: the message names file, key and problem.
            sys.stderr.write(f"{self.program}: {err}\n")
            raise SystemExit(2) from None


class Listener(MultiService):
    """One listening port: Twisted's endpoint service for ``description`` as the only child.

    A port that cannot be had when twistd starts the services (taken, forbidden) ends the
    process with exit status 1 and one critical log line naming the port, the setting and
    what to do, instead of twistd's traceback.
    """

    def __init__(self, description: str, factory: Any, reactor: Any, setting: str, reuse_port: bool = False) -> None:
        super().__init__()
        self.description, self.setting, self.reuse_port = description, setting, reuse_port
        # strports.service makes a listen that fails in privilegedStartService raise there.
        listening = reuseport.listening_reactor(reactor, reuse_port)
        strports.service(description, factory, reactor=listening).setServiceParent(self)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            log.critical("{message}", message=cannot_listen(e, self.description, self.setting, self.reuse_port))
            raise SystemExit(1) from None


def cannot_listen(err: CannotListenError, description: str, setting: str, reuse_port: bool) -> str:
    """The one line for a port that could not be had: where, which setting, why, and a hint."""
    cause = err.socketError
    why = getattr(cause, "strerror", None) or str(cause)
    where = f"{err.interface or '*'}:{err.port}"
    hint = ""
    code = getattr(cause, "errno", None)
    if code == errno.EADDRINUSE and setting == "forwarder.listen":
        hint = ("; the process holding it must also set SO_REUSEPORT and run as the same user "
                "([forwarder] reuse_port = true in every forwarder sharing it)" if reuse_port else
                "; another process holds it (forwarders on one host can share it with [forwarder] reuse_port = true)")
    elif code == errno.EADDRINUSE:
        hint = "; another process holds it (each process needs an admin endpoint of its own: --admin)"
    elif code == errno.EACCES:
        hint = "; ports below 1024 need root or CAP_NET_BIND_SERVICE"
    return f"cannot listen on {where} ({setting} {description!r}): {why}{hint}"


def add_admin(parent: MultiService, endpoint: str | None, service: Observable, reactor: Any) -> None:
    if endpoint:
        Listener(endpoint, admin_site(service), reactor, "admin.listen").setServiceParent(parent)


def add_reload(parent: MultiService, options: Any, apply: Callable[[Any], None], reactor: Any) -> None:
    """SIGHUP re-reads ``--config`` with the same command-line overrides as at start."""
    path, overrides, names = options["config"], options.overrides(), options["option_names"]
    loader = type(options).loader
    ReloadOnHangup(path, lambda: loader(path, overrides, names), apply, reactor).setServiceParent(parent)
