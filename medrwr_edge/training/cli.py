"""`medrwr-edge train {sft,dpo,grpo} CONFIG`: the training stages from a YAML/JSON config (the `[train]` extra).

    medrwr-edge train sft examples/train/sft-tiny-cpu.yaml [--max-steps N] [--no-resume] [--force-resume]

A run resumes from `OUTPUT/checkpoints/latest` by default. The same command runs under a launcher:

    accelerate launch --config_file examples/train/accelerate-fsdp-8gpu.yaml -m medrwr_edge.training sft CONFIG
    torchrun --nproc_per_node 8 -m medrwr_edge.training grpo CONFIG

Nothing here imports torch until a command runs, so mounting it costs the edge CLI nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from ..errors import InputError

train_app = typer.Typer(no_args_is_help=True, add_completion=False)

_CONFIG = typer.Argument(..., help="run config (YAML or JSON); see examples/train/")
_MAX_STEPS = typer.Option(None, "--max-steps", help="override max_steps from the config")
_RESUME = typer.Option(True, "--resume/--no-resume", help="continue from OUTPUT/checkpoints/latest if there is one")
_FORCE = typer.Option(False, "--force-resume", help="resume even though the config or a data file changed")
_QUIET = typer.Option(False, "--quiet", help="no progress bar (metrics still go to metrics.jsonl)")


def _require_train_extra() -> None:
    missing = []
    for mod in ("torch", "transformers", "safetensors", "accelerate", "yaml"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise InputError(f"training needs {', '.join(missing)}: pip install -e '.[train]'")


@train_app.command("sft")
def sft_cmd(config: Path = _CONFIG, max_steps: Optional[int] = _MAX_STEPS, resume: bool = _RESUME,
            force_resume: bool = _FORCE, quiet: bool = _QUIET) -> None:
    """Supervised fine-tuning on reasoning traces (loss on the assistant's tokens only)."""
    _require_train_extra()
    from .config import SFTConfig, load_config
    from .sft import train_sft

    cfg = load_config(config, SFTConfig, {"max_steps": max_steps})
    _report(train_sft(cfg, resume=resume, force_resume=force_resume, quiet=quiet))


@train_app.command("dpo")
def dpo_cmd(config: Path = _CONFIG, max_steps: Optional[int] = _MAX_STEPS, resume: bool = _RESUME,
            force_resume: bool = _FORCE, quiet: bool = _QUIET) -> None:
    """Direct preference optimisation on (prompt, chosen, rejected) pairs against a frozen reference."""
    _require_train_extra()
    from .config import DPOConfig, load_config
    from .dpo import train_dpo

    cfg = load_config(config, DPOConfig, {"max_steps": max_steps})
    _report(train_dpo(cfg, resume=resume, force_resume=force_resume, quiet=quiet))


@train_app.command("grpo")
def grpo_cmd(config: Path = _CONFIG, max_steps: Optional[int] = _MAX_STEPS, resume: bool = _RESUME,
             force_resume: bool = _FORCE, quiet: bool = _QUIET) -> None:
    """GRPO with Med-RwR's rewards (stage 1 text MCQ, stage 2 multimodal), retrieval in the rollouts."""
    _require_train_extra()
    from .config import load_config
    from .grpo import GRPOConfig, train_grpo

    cfg = load_config(config, GRPOConfig, {"max_steps": max_steps})
    _report(train_grpo(cfg, resume=resume, force_resume=force_resume, quiet=quiet))


def _report(checkpoint) -> None:
    """Print the last checkpoint's path once (rank 0 of a launched run)."""
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(str(checkpoint) if checkpoint else "no checkpoint written")


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train", help="Train Med-RwR: SFT, DPO and GRPO stages (needs the train extra).")
