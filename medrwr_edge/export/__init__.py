"""Exporters (extra `[export]`): trained checkpoints -> edge artefacts. The only code that imports torch.

Exports read LOCAL directories only: the Hugging Face libraries are told to stay offline, so a mistyped path is
a clear error instead of a silent download from a model hub.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
