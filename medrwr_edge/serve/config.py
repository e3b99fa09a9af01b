"""Settings of `medrwr-edge serve`, and the checks that keep the service safe by default.

Safe by default: loopback only; any other address needs an API key (compared in constant time); request bodies
are capped before they are read; CORS is off unless an origin is named.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import InputError

MIN_API_KEY_CHARS = 16
MAX_ENGINE_PARALLEL = 64


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: Optional[str] = None  # None: no key asked (allowed on loopback only)
    max_queue: int = 8  # requests waiting behind the one being answered; more get 429 + Retry-After
    max_body_bytes: int = 32 * 1024 * 1024  # refused with 413 before the body is read past this
    cors_origins: list[str] = field(default_factory=list)  # empty: no CORS headers at all
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish on shutdown before being aborted
    keepalive_seconds: float = 15.0  # an SSE comment this often on a quiet stream (queued, or a long step)
    keep_reports: int = 32  # finished requests whose HTML report stays available at /v1/reports/{id}
    max_tokens_limit: int = 2048  # the most a request may ask for per generation pass
    log_answers: bool = False  # append each answer to the local answer log (command "api"); the CLI turns it on
    # With --engine: questions answered at once, each on its own server sequence (None: the server's slots, else 1).
    # In-process the model decodes one sequence: always 1.
    engine_parallel: Optional[int] = None

    @classmethod
    def from_options(cls, **options) -> "ServeConfig":
        """The defaults changed by the options the user set; None means unset."""
        return cls(**{k: v for k, v in options.items() if v is not None})

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port must be between 0 and 65535 (got {self.port})")
        if self.max_queue < 0:
            raise InputError(f"--max-queue must be at least 0 (got {self.max_queue})")
        if self.keep_reports < 0:
            raise InputError(f"--keep-reports must be at least 0 (got {self.keep_reports})")
        if self.engine_parallel is not None and not 1 <= self.engine_parallel <= MAX_ENGINE_PARALLEL:
            raise InputError(f"--engine-parallel must be between 1 and {MAX_ENGINE_PARALLEL} "
                             f"(got {self.engine_parallel})")
        if self.max_body_bytes < 1024:
            raise InputError("--max-body-mb is too small")
        if not is_loopback(self.host) and not self.api_key:
            raise InputError(
                f"refusing to listen on {self.host}: addresses other than loopback need --api-key-file "
                "(clients then send 'Authorization: Bearer KEY')"
            )
        if "*" in self.cors_origins and not self.api_key:
            raise InputError("--cors-origin '*' lets any web page call the model: it needs --api-key-file")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or 'localhost'. A name other than localhost counts as not loopback (it may resolve anywhere)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_api_key(path: str | os.PathLike) -> str:
    """The key is the file's first line. Refuse an empty or short key: a guessable key is no protection."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"API key file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read API key file {p}: {getattr(e, 'strerror', None) or type(e).__name__}") from None
    key = (text.strip().splitlines() or [""])[0].strip()
    if len(key) < MIN_API_KEY_CHARS:
        raise InputError(f"the API key in {p} is shorter than {MIN_API_KEY_CHARS} characters")
    if any(c.isspace() for c in key) or not key.isprintable():
        raise InputError(f"the API key in {p} must be one line of printable characters without spaces")
    return key
