"""What both twistd plugins share: options, config loading and the admin server."""

from __future__ import annotations

import sys
from typing import Any, Callable, Mapping

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.python import usage

from ppbridge.admin import Observable, admin_site
from ppbridge.errors import ConfigError
from ppbridge.reload import ReloadOnHangup


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


def add_admin(parent: MultiService, endpoint: str | None, service: Observable, reactor: Any) -> None:
    if endpoint:
        strports.service(endpoint, admin_site(service), reactor=reactor).setServiceParent(parent)


def add_reload(parent: MultiService, options: Any, apply: Callable[[Any], None], reactor: Any) -> None:
    """SIGHUP re-reads ``--config`` with the same command-line overrides as at start."""
    path, overrides, names = options["config"], options.overrides(), options["option_names"]
    loader = type(options).loader
    ReloadOnHangup(path, lambda: loader(path, overrides, names), apply, reactor).setServiceParent(parent)
