"""Exporters (extra `[export]`): trained checkpoints -> edge artefacts. The only code that imports torch.

Exports read LOCAL directories only: the Hugging Face libraries are told to stay offline, so a mistyped path is
a clear error instead of a silent download from a model hub.
"""

from ..offline import apply_offline_defaults

apply_offline_defaults()  # also when the exporters are used as a library, not through the CLI
