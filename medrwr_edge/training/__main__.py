"""`python -m medrwr_edge.training {sft,dpo,grpo} CONFIG`: the entry point for launchers.

    torchrun --nproc_per_node 8 -m medrwr_edge.training sft CONFIG
    accelerate launch --config_file examples/train/accelerate-fsdp-8gpu.yaml -m medrwr_edge.training sft CONFIG

Same commands and one-line errors as `medrwr-edge train …`.
"""

from __future__ import annotations

import sys

from ..cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
