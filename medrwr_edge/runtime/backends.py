"""Which backend generates the tokens, and what the evidence record says about it.

An inference server (`AskSettings.engine`), an exported Med-RwR bundle (GGUF decoder + ONNX vision encoder), or a
GGUF run in process by llama.cpp. Which file a `--model` value names is the installer's business
(`assets.find_model`); how each backend runs is its own module's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from ..errors import InputError
from .settings import AskSettings

PathLike = Union[str, os.PathLike]


def load_backend(model: Optional[PathLike], settings: AskSettings):
    """The backend for a GGUF file, a model folder or an installed model name (default: the default LLM), or the
    inference server at settings.engine."""
    if settings.engine:
        if model is not None:
            raise InputError("{engine} generates with the model the server has loaded; {model} is for the "
                             "in-process backend: give one or the other", names=("engine", "model"))
        from .server_backend import ServerBackend

        return ServerBackend(settings.engine, timeout=settings.engine_timeout, n_ctx=settings.n_ctx,
                             api_key=os.environ.get("MEDRWR_ENGINE_API_KEY") or None)
    from .. import assets
    from ..export.bundle import is_bundle
    from ..paths import cached_sha256, data_dir

    path = assets.find_model(model)
    if is_bundle(path):  # an exported Med-RwR bundle: GGUF decoder + ONNX vision encoder, hashes checked
        from .multimodal_backend import load_bundle

        backend = load_bundle(path, n_ctx=settings.n_ctx, gpu_layers=settings.gpu_layers, seed=settings.seed)
        backend.info.declares_protocol = True  # an exported Med-RwR checkpoint: trained on the protocol
        return backend
    from .llama_backend import LlamaBackend
    from .speculative import speculative_args

    return LlamaBackend(
        path,
        n_ctx=settings.n_ctx,
        gpu_layers=settings.gpu_layers,
        seed=settings.seed,
        n_threads=settings.n_threads,
        sha256=cached_sha256(path),
        prefix_cache_dir=str(data_dir() / "prefix-cache") if settings.prefix_cache else None,
        **speculative_args(settings.speculative, settings.draft_model),
    )


def model_record(backend) -> dict:
    """The evidence record's "model": which file, which backend on which device, built how."""
    info = backend.info
    return {
        "name": Path(info.model_path).name,
        "path": str(Path(info.model_path).resolve()),
        "sha256": info.model_sha256,
        "backend": info.name,
        "has_vision": info.has_vision,
        "device": info.device,
        "gpu_layers": info.gpu_layers,
        "n_ctx": info.n_ctx,
        "build": info.build,
        "compute": dict(info.compute),
        "speculative": backend.speculative_record() if hasattr(backend, "speculative_record") else {"mode": "off"},
    }
