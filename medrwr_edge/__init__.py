"""medrwr-edge: an offline edge runtime for Med-RwR (reasoning with retrieval for medical VLMs).

The public API is imported lazily so that `import medrwr_edge` stays light (no onnxruntime/llama.cpp
until they are needed) and never pulls in torch or transformers.
"""

__version__ = "0.1.0"

__all__ = ["ask", "Session", "Chat", "Pack", "__version__"]


def __getattr__(name):
    if name == "ask":
        from .runtime.api import ask

        return ask
    if name == "Session":
        from .runtime.api import Session

        return Session
    if name == "Chat":
        from .runtime.chat import Chat

        return Chat
    if name == "Pack":
        from .kb_pack.pack import Pack

        return Pack
    raise AttributeError(name)
