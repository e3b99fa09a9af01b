"""Network tripwire for test subprocesses: put this folder first on PYTHONPATH and Python imports it at start-up.

Every Python-level way to reach a network -- socket connect/connect_ex/sendto, create_connection, and the DNS
lookups getaddrinfo/gethostbyname(_ex)/gethostbyaddr/getnameinfo -- is replaced by a function that appends one line
to $MEDRWR_NETGUARD_LOG and raises OSError(ENETUNREACH). The test then fails on any logged attempt, even one the
program caught and recovered from. Each guarded process also logs an "armed" line, so a test can prove the guard
was really loaded in the process it ran. Code below Python (C libraries) is covered by running the same command
in a network namespace with no interfaces (`unshare -rn`) where that is possible.
"""

import errno
import os
import socket
import sys

_LOG = os.environ.get("MEDRWR_NETGUARD_LOG")


def _note(line: str) -> None:
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {line}\n")


def _blocked(what):
    def refuse(*args, **kwargs):
        shown = ", ".join(repr(a) for a in args if not isinstance(a, socket.socket))[:200]
        _note(f"BLOCKED {what}({shown})")
        raise OSError(errno.ENETUNREACH, f"network access blocked by the test harness: {what}")

    return refuse


if _LOG:
    for _name in ("connect", "connect_ex", "sendto", "sendmsg"):
        setattr(socket.socket, _name, _blocked(f"socket.{_name}"))
    for _name in ("create_connection", "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr",
                  "getnameinfo"):
        setattr(socket, _name, _blocked(_name))
    _note("armed " + " ".join(sys.argv)[:300])
