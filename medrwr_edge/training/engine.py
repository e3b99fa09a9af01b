"""The training engine: one object every stage (SFT, DPO, GRPO) drives, over Hugging Face `accelerate`.

The same script runs as one plain CPU process (tests), or under `torchrun` / `accelerate launch` on many GPUs:
`accelerate` reads the launcher's environment and wraps the model in DDP or FSDP; we only choose which (config
`distributed`) and keep everything else here explicit:

    engine = TrainEngine(config, stage="sft")
    model, optimizer, scheduler, step = engine.start(model, resume=True, force_resume=False)
    # = engine.prepare(model, build_optimizer(model, config)), then engine.resume(...): step 0 on a fresh run
    while step < config.max_steps:
        for micro in range(config.grad_accumulation):
            with engine.accumulate(model), engine.autocast():
                loss = ...
            engine.backward(loss)
            grad_norm = engine.step(optimizer, model, scheduler)         # None until the last micro-step
        step += 1
        engine.log(step, {"loss": ..., "grad_norm": grad_norm})          # collective: every rank calls it
        if engine.should_save(step): engine.save_checkpoint(step, model, optimizer, scheduler, extra={...})

Checkpoints hold no pickle. `OUTPUT/checkpoints/step-0000100/` is a loadable HF model directory
(config.json + model.safetensors + the tokenizer/processor files of the starting model, so
`medrwr-edge export model` and `from_pretrained` take it as is); its `train_state/` subfolder holds the optimiser
state flattened into optimizer.safetensors + optimizer.json, scheduler.json, each rank's RNG states, the run
config (run_config.json), the sha256 of every data file (data_hashes.json) and trainer_state.json (step, the
caller's extra data, versions). A checkpoint is written to a temp directory and renamed, so an interrupted save
leaves the previous one intact; `checkpoints/latest` names the newest. Resume refuses a changed config or data
file unless forced, and restores RNG states so the next step is bit-identical.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import InputError, IntegrityError
from ..paths import atomic_write_text, sha256_file
from .config import RunConfig, config_to_dict, renamed_keys

CHECKPOINT_FORMAT = "medrwr-edge/train-checkpoint/1"
TRAIN_STATE = "train_state"  # subfolder of a checkpoint: everything that is not the model itself
# Config keys that may change between a run and its resumption (they do not change what a step computes).
RESUMABLE_CHANGES = frozenset({"max_steps", "save_every", "keep_checkpoints", "log_every", "tensorboard", "output_dir"})
# Weight files of the starting checkpoint are replaced by ours; everything else (tokenizer, processor, chat
# template, generation config) is copied so the checkpoint loads and exports on its own.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def build_optimizer(model, config: RunConfig):
    """AdamW over the trainable parameters (no weight decay on biases and norms, as usual for transformers)."""
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate, betas=(0.9, 0.999),
                             eps=1e-8)


class TrainEngine:
    """Device, precision, distribution, optimiser stepping, checkpoints and metrics for one training run."""

    def __init__(self, config: RunConfig, stage: str, *, quiet: bool = False):
        import torch
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config = config
        self.stage = stage
        self.output_dir = Path(config.output_dir)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available()
        strategy = config.distributed
        if strategy == "auto":
            strategy = ("fsdp" if cuda else "ddp") if world > 1 else "none"
        if world == 1:
            strategy = "none"
        kwargs: dict[str, Any] = {}
        if strategy == "fsdp" and os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
            from accelerate import FullyShardedDataParallelPlugin

            # FSDP2 (per-parameter sharding); full state dicts on save so checkpoints are plain HF directories.
            kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
                fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
                state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False)
        # fp32 on CPU: bf16 autocast on CPU is slow and changes numerics for the tests.
        mixed = "bf16" if cuda and config.bf16 else "no"
        self.accelerator = Accelerator(mixed_precision=mixed, cpu=not cuda, **kwargs)
        kind = str(self.accelerator.distributed_type).split(".")[-1].lower()  # "no", "multi_gpu", "fsdp", ...
        self.strategy = {"no": "single process", "multi_cpu": "ddp (cpu)", "multi_gpu": "ddp"}.get(kind, kind)
        self.mixed_precision = mixed
        self.requested_strategy = strategy
        set_seed(config.seed)
        self._micro = 0
        self._quiet = quiet or not self.is_main
        self._metrics_file = None
        self._tb = None
        self._progress = None
        self._task = None
        self._data_hashes: Optional[dict[str, str]] = None
        if strategy == "fsdp" and kind != "fsdp":  # accelerate shards only on accelerators
            self.print("note: FSDP needs GPUs; these CPU processes run DDP (full replicas) instead")
        self._perms: dict[int, list[int]] = {}

    # ---- where we run ---------------------------------------------------------------------------------------------

    @property
    def device(self):
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def examples_per_step(self) -> int:
        return self.config.batch_size * self.config.grad_accumulation * self.world_size

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def unwrap(self, model):
        """The plain HF model under DDP/FSDP wrappers (for generation, saving, config access)."""
        return self.accelerator.unwrap_model(model)

    def reduce_mean(self, value: float) -> float:
        """The mean of a scalar over all processes (collective: every rank must call it)."""
        if self.world_size == 1:
            return float(value)
        import torch

        t = torch.tensor([float(value)], device=self.device, dtype=torch.float64)
        return float(self.accelerator.reduce(t, reduction="mean").item())

    def batch_indices(self, n_rows: int, step: int, micro: int = 0) -> list[int]:
        """The data rows this process uses at (optimiser step `step` counted from 0, micro-step `micro`).

        A pure function of seed and position: each epoch is a seeded permutation of the rows, consumed in order
        by (step, micro-step, rank, slot). A resumed run therefore sees exactly the batches it would have seen,
        with no data-loader state to save, and no two ranks share a row within an epoch.
        """
        import torch

        if n_rows < 1:
            raise InputError("no training rows")
        bs = self.config.batch_size
        base = ((step * self.config.grad_accumulation + micro) * self.world_size + self.rank) * bs
        out = []
        for slot in range(base, base + bs):
            epoch, pos = divmod(slot, n_rows)
            if epoch not in self._perms:
                g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
                self._perms = {epoch: torch.randperm(n_rows, generator=g).tolist()}  # only the current epoch
            out.append(self._perms[epoch][pos])
        return out

    # ---- model and optimiser --------------------------------------------------------------------------------------

    def prepare(self, model, optimizer):
        """Move/wrap model and optimiser for this launch; returns (model, optimizer, scheduler).

        The scheduler (linear warm-up to `learning_rate`, then constant) is stepped by `step()` once per optimiser
        step; it is not handed to accelerate, which would step it once per process.
        """
        import torch

        if self.config.gradient_checkpointing:
            if not hasattr(model, "gradient_checkpointing_enable"):
                raise InputError("gradient_checkpointing: this model does not support it")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if getattr(model, "config", None) is not None:
                model.config.use_cache = False  # a KV cache is useless (and wrong) under recomputation
        model.train()
        model, optimizer = self.accelerator.prepare(model, optimizer)
        warmup = self.config.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            _inner_optimizer(optimizer), lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        return model, optimizer, scheduler

    def prepare_frozen(self, model):
        """A frozen model (DPO reference, GRPO reference): no grads, eval mode, on the device, replicated.

        On GPU it is kept in bf16 when bf16 is on (it is only ever run forward); on CPU in fp32.
        """
        import torch

        model.requires_grad_(False)
        model.eval()
        dtype = torch.bfloat16 if self.mixed_precision == "bf16" else None
        return model.to(device=self.device, dtype=dtype) if dtype else model.to(self.device)

    def autocast(self):
        """bf16 autocast on GPU when configured; a no-op on CPU."""
        return self.accelerator.autocast()

    def accumulate(self, model):
        """Wrap forward+backward of a micro-step: skips the gradient all-reduce except on the last micro-step."""
        boundary = (self._micro + 1) % self.config.grad_accumulation == 0
        if boundary or self.world_size == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def backward(self, loss) -> None:
        """Backpropagate `loss` (the mean over this micro-batch), scaled for gradient accumulation."""
        self.accelerator.backward(loss / self.config.grad_accumulation)

    def step(self, optimizer, model, scheduler=None) -> Optional[float]:
        """End a micro-step. On the last one of an optimiser step: clip, step, zero grads and return the grad
        norm measured before clipping; otherwise return None."""
        self._micro += 1
        if self._micro % self.config.grad_accumulation:
            return None
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf
        norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2 returns the norm as a DTensor
            norm = norm.full_tensor()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self._micro = 0
        return float(norm)

    # ---- checkpoints ----------------------------------------------------------------------------------------------

    @property
    def checkpoints_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def should_save(self, step: int) -> bool:
        every = self.config.save_every
        return (every > 0 and step % every == 0) or step >= self.config.max_steps

    def data_hashes(self) -> dict[str, str]:
        """sha256 of every data file the config names (computed once per run)."""
        if self._data_hashes is None:
            hashes = {}
            for f in self.config.data_files():
                if not Path(f).is_file():
                    raise InputError(f"data file not found: {f}")
                hashes[str(f)] = sha256_file(f)
            self._data_hashes = hashes
        return self._data_hashes

    def save_checkpoint(self, step: int, model, optimizer, scheduler=None, extra: Optional[dict] = None) -> Path:
        """Write checkpoints/step-NNNNNNN atomically (collective: every rank calls it); returns its path.

        `extra` is JSON data of the caller's (e.g. a data cursor, a reward baseline); `resume` hands it back.
        """
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        name = f"step-{step:07d}"
        final = self.checkpoints_dir / name
        tmp = self.checkpoints_dir / f".{name}.partial"
        state_dir = tmp / TRAIN_STATE
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            state_dir.mkdir(parents=True)
        self.barrier()
        try:
            # Full (gathered) state dicts: identical to a single-process run whatever the sharding.
            plain = self.unwrap(model)
            model_state, optim_state = get_state_dict(
                plain, _inner_optimizer(optimizer), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            rng_tensors, rng_json = _rng_state()
            save_file(rng_tensors, str(state_dir / f"rng-rank{self.rank}.safetensors"))
            atomic_write_text(state_dir / f"rng-rank{self.rank}.json", json.dumps(rng_json))
            if self.is_main:
                self._write_model(plain, model_state, tmp)
                tensors, meta = _flatten_optimizer_state(optim_state)
                save_file(tensors, str(state_dir / "optimizer.safetensors"))
                atomic_write_text(state_dir / "optimizer.json", json.dumps(meta, indent=1))
                sched = _json_safe(scheduler.state_dict()) if scheduler is not None else None
                atomic_write_text(state_dir / "scheduler.json", json.dumps(sched, indent=1))
                atomic_write_text(state_dir / "run_config.json", json.dumps(config_to_dict(self.config), indent=2))
                atomic_write_text(state_dir / "data_hashes.json", json.dumps(self.data_hashes(), indent=2))
                atomic_write_text(state_dir / "trainer_state.json", json.dumps({
                    "format": CHECKPOINT_FORMAT, "stage": self.stage, "step": step, "world_size": self.world_size,
                    "examples_seen": step * self.examples_per_step, "extra": extra or {},
                    "strategy": self.strategy, "mixed_precision": self.mixed_precision,
                    "versions": _versions(),
                }, indent=2))
            self.barrier()
            if self.is_main:
                if final.exists():  # a re-run of the same step (after resume --force): replace it whole
                    shutil.rmtree(final)
                os.replace(tmp, final)
                atomic_write_text(self.checkpoints_dir / "latest", name + "\n")
                self._prune()
        except BaseException:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.barrier()
        return final

    def _write_model(self, plain, model_state: dict, out: Path) -> None:
        """`plain.save_pretrained` with the gathered weights, plus the starting checkpoint's other files."""
        plain.save_pretrained(out, state_dict=model_state, safe_serialization=True)
        cfg_file = out / "config.json"
        cfg = json.loads(cfg_file.read_text("utf-8"))
        if not cfg.get("architectures"):  # transformers 4.57 leaves it out of composite configs; export needs it
            cfg["architectures"] = [type(plain).__name__]
            cfg_file.write_text(json.dumps(cfg, indent=2), "utf-8")
        src = Path(self.config.model)
        if src.is_dir():
            for f in sorted(src.iterdir()):
                if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.endswith(".index.json") \
                        and not (out / f.name).exists():
                    shutil.copy2(f, out / f.name)

    def _prune(self) -> None:
        steps = sorted(p for p in self.checkpoints_dir.glob("step-*") if p.is_dir())
        for old in steps[: max(0, len(steps) - self.config.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Optional[Path]:
        marker = self.checkpoints_dir / "latest"
        if not marker.is_file():
            return None
        path = self.checkpoints_dir / marker.read_text("utf-8").strip()
        return path if path.is_dir() else None

    def start(self, model, *, resume: bool, force_resume: bool):
        """What every stage does first: prepare the model with its optimiser and scheduler, then resume from the
        latest checkpoint (unless `resume` is False). Returns (model, optimizer, scheduler, step)."""
        model, optimizer, scheduler = self.prepare(model, build_optimizer(model, self.config))
        step, _ = self.resume(model, optimizer, scheduler, force=force_resume) if resume else (0, {})
        return model, optimizer, scheduler, step

    def resume(self, model, optimizer, scheduler=None, *, checkpoint: Optional[str | Path] = None,
               force: bool = False) -> tuple[int, dict]:
        """Load the latest (or the given) checkpoint into model/optimizer/scheduler and this rank's RNGs.

        Returns (step, extra); (0, {}) when there is nothing to resume. Refuses, in one line, when the run config
        or a data file changed since the checkpoint, unless `force`.
        """
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        ckpt = Path(checkpoint) if checkpoint else self.latest_checkpoint()
        if ckpt is None:
            return 0, {}
        state_dir = ckpt / TRAIN_STATE
        state_file = state_dir / "trainer_state.json"
        if not state_file.is_file():
            raise InputError(f"not a training checkpoint (no {TRAIN_STATE}/trainer_state.json): {ckpt}")
        state = json.loads(state_file.read_text("utf-8"))
        if state.get("format") != CHECKPOINT_FORMAT or state.get("stage") != self.stage:
            raise InputError(f"{ckpt} is a {state.get('stage')!r} checkpoint, not {self.stage!r}")
        if not force:
            self._check_unchanged(ckpt)
        plain = self.unwrap(model)
        weights = {}
        for f in sorted(ckpt.glob("*.safetensors")):
            if f.name.startswith("model"):
                weights.update(load_file(str(f)))
        weights = _to_model_keys(weights, plain)
        optim_state = _unflatten_optimizer_state(load_file(str(state_dir / "optimizer.safetensors")),
                                                 json.loads((state_dir / "optimizer.json").read_text("utf-8")))
        missing = set(plain.state_dict()) - set(weights)
        if missing - _tied_keys(plain):
            raise IntegrityError(f"{ckpt}: the checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[0]}")
        set_state_dict(plain, _inner_optimizer(optimizer), model_state_dict=weights, optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=True, strict=False))
        if scheduler is not None:
            sched = json.loads((state_dir / "scheduler.json").read_text("utf-8"))
            if sched:
                scheduler.load_state_dict({**scheduler.state_dict(), **sched})
        rng_file = state_dir / f"rng-rank{self.rank}.safetensors"
        if rng_file.is_file():
            _set_rng_state(load_file(str(rng_file)),
                           json.loads((state_dir / f"rng-rank{self.rank}.json").read_text("utf-8")))
        else:
            self.print(f"note: {ckpt.name} has no RNG state for rank {self.rank} (world size changed): seeded anew")
        self._micro = 0
        return int(state["step"]), dict(state.get("extra") or {})

    def _check_unchanged(self, ckpt: Path) -> None:
        saved = renamed_keys(json.loads((ckpt / TRAIN_STATE / "run_config.json").read_text("utf-8")),
                             type(self.config))
        now = config_to_dict(self.config)
        for key in sorted(set(saved) | set(now)):
            if key not in RESUMABLE_CHANGES and saved.get(key) != now.get(key):
                raise InputError(f"config changed since {ckpt.name}: {key} was {saved.get(key)!r}, now "
                                 f"{now.get(key)!r} (use --force-resume to resume anyway)")
        saved_hashes = json.loads((ckpt / TRAIN_STATE / "data_hashes.json").read_text("utf-8"))
        for path, digest in self.data_hashes().items():
            if saved_hashes.get(path) != digest:
                raise InputError(f"data file changed since {ckpt.name}: {path} (use --force-resume to resume anyway)")

    # ---- metrics --------------------------------------------------------------------------------------------------

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Average numeric metrics over ranks, append one JSON line to metrics.jsonl, update TensorBoard and the
        progress bar (main process). Collective: every rank calls it with the same keys."""
        row: dict[str, Any] = {"step": step, "time": round(time.time(), 3)}
        for key, value in metrics.items():
            if value is None:
                continue
            row[key] = self.reduce_mean(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
                else value
        if not self.is_main:
            return
        if self._metrics_file is None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._metrics_file = open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8")
            if self.config.tensorboard:
                self._tb = _tensorboard_writer(self.output_dir / "tensorboard")
        self._metrics_file.write(json.dumps(row) + "\n")
        self._metrics_file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{self.stage}/{key}", value, step)
        if self._progress is not None:
            shown = "  ".join(f"{k} {v:.4g}" for k, v in row.items()
                              if k in ("loss", "reward", "kl", "grad_norm") and isinstance(v, float))
            self._progress.update(self._task, completed=step, info=shown)

    @contextlib.contextmanager
    def progress(self, start: int, total: int) -> Iterator[None]:
        """A rich progress bar on the main process (silent elsewhere and when quiet)."""
        if self._quiet:
            yield
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn(f"[bold]{self.stage}[/]"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), TextColumn("{task.fields[info]}")) as bar:
            self._progress, self._task = bar, bar.add_task(self.stage, total=total, completed=start, info="")
            try:
                yield
            finally:
                self._progress = self._task = None

    def print(self, message: str) -> None:
        """A status line on stderr, from the main process only."""
        if self.is_main:
            from rich.console import Console

            Console(stderr=True, soft_wrap=True).print(message, highlight=False, markup=False)

    def close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self.accelerator.end_training()


# ---- helpers ------------------------------------------------------------------------------------------------------


def _inner_optimizer(optimizer):
    """The torch optimiser under accelerate's AcceleratedOptimizer wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _flatten_optimizer_state(state: dict) -> tuple[dict, dict]:
    """{"state": {fqn: {name: tensor|number}}, "param_groups": [...]} → (safetensors dict, JSON for the rest)."""
    import torch

    tensors: dict[str, Any] = {}
    scalars: dict[str, dict] = {}
    for fqn, entry in state.get("state", {}).items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{fqn}/{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(fqn), {})[name] = value
    meta = {"param_groups": _json_safe(state.get("param_groups", [])), "scalars": _json_safe(scalars),
            "tensor_params": sorted({str(k).rsplit("/", 1)[0] for k in tensors})}
    return tensors, meta


def _unflatten_optimizer_state(tensors: dict, meta: dict) -> dict:
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        fqn, name = key.rsplit("/", 1)
        state.setdefault(fqn, {})[name] = value
    for fqn, entry in meta.get("scalars", {}).items():
        state.setdefault(fqn, {}).update(entry)
    groups = []
    for g in meta.get("param_groups", []):
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _json_safe(value: Any) -> Any:
    """Plain JSON values; tuples become lists, callables and other objects are dropped (LambdaLR's lambdas)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items() if _is_plain(v)}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value if _is_plain(v)]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # a 0-d tensor
        return value.item()
    return value


def _is_plain(value: Any) -> bool:
    if isinstance(value, (dict, list, tuple, str, int, float, bool)) or value is None:
        return True
    return hasattr(value, "item") and getattr(value, "ndim", 1) == 0


def _rng_state() -> tuple[dict, dict]:
    """Python, NumPy, torch CPU and CUDA generator states: tensors for safetensors, the rest for JSON."""
    import numpy as np
    import torch

    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(),
               "numpy_mt": torch.from_numpy(np.asarray(np_state[1], dtype=np.uint32).astype(np.int64))}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    meta = {"python": [version, list(mt), gauss], "numpy": [np_state[0], int(np_state[2]), int(np_state[3]),
                                                            float(np_state[4])]}
    return tensors, meta


def _set_rng_state(tensors: dict, meta: dict) -> None:
    import numpy as np
    import torch

    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_mt"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


def _to_model_keys(weights: dict, model) -> dict:
    """Checkpoint key names → the model's own (HF saves Qwen2.5-VL under its legacy names, e.g. `model.layers`
    for `model.language_model.layers`; `_checkpoint_conversion_mapping` says how to map them back)."""
    own = set(model.state_dict())
    if set(weights) <= own:
        return weights
    mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}
    out = {}
    for key, value in weights.items():
        new = key
        if key not in own:
            for pattern, replacement in mapping.items():
                candidate = re.sub(pattern, replacement, key)
                if candidate != key:
                    new = candidate
                    break
        out[new] = value
    return out


def _tied_keys(model) -> set[str]:
    """Weights that share storage with another one (an LM head tied to the embeddings): not saved twice."""
    seen: dict[int, str] = {}
    tied = set()
    for name, t in model.state_dict(keep_vars=True).items():
        ptr = t.data_ptr()
        if ptr in seen:
            tied.add(name)
        else:
            seen[ptr] = name
    return tied


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("note: tensorboard is not installed (pip install tensorboard): metrics go to metrics.jsonl only",
              file=sys.stderr)
        return None
    return SummaryWriter(str(path))


def _versions() -> dict:
    import torch

    out = {"torch": torch.__version__}
    for mod in ("transformers", "accelerate"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out
