"""The training engine: configs, a real optimisation step, checkpoints without pickle, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training_helpers import require_train_deps, state_copy, tiny_causal_lm, tiny_vl, write_jsonl, write_yaml

from medrwr_edge.errors import InputError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    require_train_deps()
    return tmp_path_factory.mktemp("train-engine")


@pytest.fixture(scope="module")
def vl(root):
    return tiny_vl(root)


@pytest.fixture(scope="module")
def text_lm(root):
    return tiny_causal_lm(root / "tiny-qwen2")


def _config(tmp_path, model, **kw):
    from medrwr_edge.training.config import RunConfig

    values = dict(model=str(model), output_dir=str(tmp_path / "run"), learning_rate=1e-2, max_steps=3)
    values.update(kw)
    return RunConfig(**values)


def _fixed_batch(vocab: int = 400, seed: int = 5):
    import torch

    ids = torch.randint(3, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}


def _loss(model, batch):
    from medrwr_edge.training.modeling import token_logprobs

    logp, mask = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    return -logp.sum() / mask.sum()


def _engine(config):
    from medrwr_edge.training.engine import TrainEngine

    return TrainEngine(config, stage="test", quiet=True)


def _prepared(config, model_dir):
    from medrwr_edge.training.engine import build_optimizer
    from medrwr_edge.training.modeling import load_model

    engine = _engine(config)
    lm = load_model(model_dir)
    model, optimizer, scheduler = engine.prepare(lm.model, build_optimizer(lm.model, config))
    return engine, model, optimizer, scheduler


def _train_steps(engine, model, optimizer, scheduler, batch, steps, first=0, save_at=None):
    losses = []
    for step in range(first, first + steps):
        for micro in range(engine.config.grad_accumulation):
            with engine.accumulate(model), engine.autocast():
                loss = _loss(model, batch)
            engine.backward(loss)
            engine.step(optimizer, model, scheduler)
        losses.append(float(loss.detach()))
        engine.log(step + 1, {"loss": float(loss.detach())})
        if save_at == step + 1:
            engine.save_checkpoint(step + 1, model, optimizer, scheduler, extra={"cursor": step + 1})
    return losses


# ------------------------------------------------------------------------------------------------ configs


def test_config_from_yaml_checks_keys_and_types(tmp_path):
    from medrwr_edge.training.config import SFTConfig, load_config

    good = write_yaml(tmp_path / "ok.yaml", {"model": "m", "output_dir": "o", "train_file": "d.jsonl",
                                             "learning_rate": 1, "max_steps": 7})
    cfg = load_config(good, SFTConfig, {"max_steps": 9, "seed": None})
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float) and cfg.max_steps == 9
    assert cfg.data_files() == ["d.jsonl"]
    typo = write_yaml(tmp_path / "typo.yaml", {"model": "m", "output_dir": "o", "train_file": "d",
                                               "leraning_rate": 1e-5})
    with pytest.raises(InputError, match=r"unknown key 'leraning_rate' .*did you mean 'learning_rate'") as e:
        load_config(typo, SFTConfig)
    assert "\n" not in str(e.value) and "typo.yaml" in str(e.value)
    for bad, message in [({"max_steps": "ten"}, "max_steps: expected an integer"),
                         ({"bf16": "yes"}, "bf16: expected true or false"),
                         ({"distributed": "deepspeed3"}, "distributed: expected one of"),
                         ({"batch_size": 0}, "batch_size must be >= 1")]:
        path = write_yaml(tmp_path / "bad.yaml", {"model": "m", "output_dir": "o", "train_file": "d", **bad})
        with pytest.raises(InputError, match=message):
            load_config(path, SFTConfig)
    with pytest.raises(InputError, match="missing required key 'train_file'"):
        load_config(write_yaml(tmp_path / "m.yaml", {"model": "m", "output_dir": "o"}), SFTConfig)
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml", SFTConfig)


def test_cli_unknown_key_is_one_error_line(tmp_path, capsys):
    from medrwr_edge.cli import main

    cfg = write_yaml(tmp_path / "c.yaml", {"model": "m", "output_dir": "o", "train_file": "d", "bogus": 1})
    with pytest.raises(SystemExit) as e:
        main(["train", "sft", str(cfg)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "'bogus'" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------------ optimisation


def test_one_real_step_changes_parameters_and_lowers_the_loss(tmp_path, vl):
    import torch

    config = _config(tmp_path, vl)
    engine, model, optimizer, scheduler = _prepared(config, vl)
    batch = _fixed_batch()
    before = state_copy(model)
    with engine.autocast():
        loss0 = _loss(model, batch)
    engine.backward(loss0)
    grad_norm = engine.step(optimizer, model, scheduler)
    with torch.no_grad():
        loss1 = _loss(model, batch)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert grad_norm is not None and grad_norm > 0
    assert float(loss1) < float(loss0.detach()) - 0.05
    assert any("lm_head" in k for k in changed) and any("layers.0" in k for k in changed)
    # the vision tower saw no image, so it had no gradient and AdamW left it as it was
    assert not any(".visual." in k for k in changed)
    engine.close()


def test_gradient_accumulation_equals_the_full_batch(tmp_path, text_lm):
    """Two accumulated micro-batches of one sequence = one step on both (same token counts, same mean)."""
    import torch

    def capture_grads(model, optimizer):
        grads = {}
        names = {id(p): n for n, p in model.named_parameters()}
        optimizer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: grads.update(
            {names[id(p)]: p.grad.clone() for g in opt.param_groups for p in g["params"] if p.grad is not None}))
        return grads

    batch = _fixed_batch()
    halves = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(2)]
    full_cfg = _config(tmp_path, text_lm, batch_size=2, output_dir=str(tmp_path / "a"))
    engine, model, optimizer, scheduler = _prepared(full_cfg, text_lm)
    full = capture_grads(model, optimizer)
    engine.backward(_loss(model, batch))
    full_norm = engine.step(optimizer, model, scheduler)
    acc_cfg = _config(tmp_path, text_lm, batch_size=1, grad_accumulation=2, output_dir=str(tmp_path / "b"))
    engine2, model2, optimizer2, scheduler2 = _prepared(acc_cfg, text_lm)
    acc = capture_grads(model2, optimizer2)
    engine2.backward(_loss(model2, halves[0]))
    assert engine2.step(optimizer2, model2, scheduler2) is None and not acc  # not yet an optimiser step
    engine2.backward(_loss(model2, halves[1]))
    acc_norm = engine2.step(optimizer2, model2, scheduler2)
    assert acc_norm == pytest.approx(full_norm, rel=1e-4)
    assert set(acc) == set(full) and len(full) > 5
    for name, grad in acc.items():
        assert torch.allclose(grad, full[name], atol=1e-6, rtol=1e-4), name


def test_warmup_schedule_and_clipping(tmp_path, text_lm):
    config = _config(tmp_path, text_lm, warmup_steps=4, max_grad_norm=1e-3)
    engine, model, optimizer, scheduler = _prepared(config, text_lm)
    assert scheduler.get_last_lr()[0] == pytest.approx(config.learning_rate / 4)
    engine.backward(_loss(model, _fixed_batch()))
    norm = engine.step(optimizer, model, scheduler)
    total = sum(float(p.grad.norm()) ** 2 for p in model.parameters() if p.grad is not None)
    assert total == 0  # zeroed after the step
    assert norm > 1e-3  # the norm before clipping is what is reported
    assert scheduler.get_last_lr()[0] == pytest.approx(config.learning_rate / 2)


def test_batch_indices_are_a_fixed_permutation_per_epoch(tmp_path, text_lm):
    config = _config(tmp_path, text_lm, batch_size=3, grad_accumulation=2, seed=4)
    engine = _engine(config)
    seen = [i for step in range(5) for micro in range(2) for i in engine.batch_indices(10, step, micro)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != list(range(10)) and seen[:10] != seen[10:20]
    assert engine.batch_indices(10, 3, 1) == _engine(config).batch_indices(10, 3, 1)  # no hidden state


# ------------------------------------------------------------------------------------------------ checkpoints


def test_resume_gives_the_bit_identical_next_step(tmp_path, vl):
    import torch

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}])
    from medrwr_edge.training.config import SFTConfig

    config = SFTConfig(model=str(vl), output_dir=str(tmp_path / "run"), train_file=str(data), learning_rate=1e-2,
                       max_steps=3, grad_accumulation=2, warmup_steps=2, weight_decay=0.1)
    batch = _fixed_batch()
    torch.manual_seed(11)
    engine, model, optimizer, scheduler = _prepared(config, vl)
    losses = _train_steps(engine, model, optimizer, scheduler, batch, 3, save_at=2)
    rng_after_step3 = torch.rand(4)
    straight = state_copy(model)
    engine.close()

    torch.manual_seed(999)  # resume must restore the RNG, not rely on the seed
    engine, model, optimizer, scheduler = _prepared(config, vl)
    step, extra = engine.resume(model, optimizer, scheduler)
    assert (step, extra) == (2, {"cursor": 2})
    assert scheduler.get_last_lr() == pytest.approx([config.learning_rate] * len(scheduler.get_last_lr()))
    resumed_losses = _train_steps(engine, model, optimizer, scheduler, batch, 1, first=2)
    assert resumed_losses == [losses[2]]
    assert torch.equal(torch.rand(4), rng_after_step3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, straight[k]), k
    engine.close()


def test_checkpoint_is_an_hf_dir_without_pickle(tmp_path, vl):
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = _config(tmp_path, vl, max_steps=1)
    engine, model, optimizer, scheduler = _prepared(config, vl)
    _train_steps(engine, model, optimizer, scheduler, _fixed_batch(), 1)
    ckpt = engine.save_checkpoint(1, model, optimizer, scheduler)
    assert ckpt.name == "step-0000001" and engine.latest_checkpoint() == ckpt
    files = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json"} <= files
    assert {"train_state/optimizer.safetensors", "train_state/optimizer.json", "train_state/run_config.json",
            "train_state/data_hashes.json", "train_state/trainer_state.json",
            "train_state/rng-rank0.safetensors"} <= files
    assert all(f.endswith((".json", ".safetensors")) for f in files), files  # no pickle anywhere
    assert [p.name for p in ckpt.glob("*.safetensors")] == ["model.safetensors"]  # export sees only the model
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert json.loads((ckpt / "train_state/run_config.json").read_text())["learning_rate"] == config.learning_rate
    optim = load_file(str(ckpt / "train_state/optimizer.safetensors"))
    assert any(k.endswith("/exp_avg_sq") for k in optim)
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, use_safetensors=True)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    engine.close()


def test_tied_embeddings_model_saves_and_resumes(tmp_path, text_lm):
    import torch

    config = _config(tmp_path, text_lm)
    engine, model, optimizer, scheduler = _prepared(config, text_lm)
    _train_steps(engine, model, optimizer, scheduler, _fixed_batch(), 1, save_at=1)
    saved = state_copy(model)
    engine.close()
    engine, model, optimizer, scheduler = _prepared(config, text_lm)
    assert engine.resume(model, optimizer, scheduler)[0] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


def test_resume_refuses_a_changed_config_or_data_unless_forced(tmp_path, text_lm):
    from medrwr_edge.training.config import SFTConfig

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}])
    base = dict(model=str(text_lm), output_dir=str(tmp_path / "run"), train_file=str(data), max_steps=2)
    engine, model, optimizer, scheduler = _prepared(SFTConfig(**base), text_lm)
    _train_steps(engine, model, optimizer, scheduler, _fixed_batch(), 1, save_at=1)
    engine.close()

    engine, model, optimizer, scheduler = _prepared(SFTConfig(**{**base, "learning_rate": 3e-4}), text_lm)
    with pytest.raises(InputError, match=r"config changed since step-0000001: learning_rate was 1e-05, now 0.0003"):
        engine.resume(model, optimizer, scheduler)
    assert engine.resume(model, optimizer, scheduler, force=True)[0] == 1
    engine, model, optimizer, scheduler = _prepared(SFTConfig(**{**base, "max_steps": 50}), text_lm)
    assert engine.resume(model, optimizer, scheduler)[0] == 1  # a longer run is a resumable change
    write_jsonl(data, [{"prompt": "p", "response": "other"}])
    engine, model, optimizer, scheduler = _prepared(SFTConfig(**base), text_lm)
    with pytest.raises(InputError, match=r"data file changed since step-0000001: .*d\.jsonl"):
        engine.resume(model, optimizer, scheduler)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, text_lm, monkeypatch):
    import safetensors.torch

    config = _config(tmp_path, text_lm, keep_checkpoints=1)
    engine, model, optimizer, scheduler = _prepared(config, text_lm)
    _train_steps(engine, model, optimizer, scheduler, _fixed_batch(), 1, save_at=1)
    real = safetensors.torch.save_file

    def save_then_interrupt(tensors, filename, *a, **kw):
        real(tensors, filename, *a, **kw)
        if "optimizer" in str(filename):
            raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        engine.save_checkpoint(2, model, optimizer, scheduler)
    ckpts = engine.checkpoints_dir
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000001"]  # no .partial left
    assert engine.latest_checkpoint().name == "step-0000001"
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    engine.save_checkpoint(2, model, optimizer, scheduler)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000002"]  # keep_checkpoints=1 pruned


def test_metrics_jsonl_has_one_line_per_logged_step(tmp_path, text_lm):
    config = _config(tmp_path, text_lm, tensorboard=True)  # without the tensorboard package: JSONL only, a note
    engine, model, optimizer, scheduler = _prepared(config, text_lm)
    _train_steps(engine, model, optimizer, scheduler, _fixed_batch(), 2)
    engine.log(3, {"reward": 0.5, "note": "text", "skipped": None})
    engine.close()
    rows = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] > rows[1]["loss"] and rows[2]["reward"] == 0.5 and "skipped" not in rows[2]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return
    assert list((Path(config.output_dir) / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_two_processes_under_torchrun_train_and_checkpoint_once(tmp_path, vl):
    """DDP over gloo on CPU: collectives in log/save line up, one checkpoint with every rank's RNG state, and a
    text-only row on one rank next to an image row on the other does not hang (the vision anchor)."""
    import os
    import shutil
    import signal
    import subprocess
    import sys

    from training_helpers import sft_rows, write_image

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    write_image(tmp_path / "img.png")
    write_jsonl(tmp_path / "sft.jsonl", sft_rows())  # one image row, one text-only row: one per rank
    cfg = write_yaml(tmp_path / "c.yaml", {"model": str(vl), "output_dir": str(tmp_path / "out"),
                                           "train_file": str(tmp_path / "sft.jsonl"), "max_steps": 2,
                                           "batch_size": 1, "learning_rate": 0.01, "distributed": "ddp"})
    # --standalone: a local rendezvous on a free port; its own session so a hang can be killed with its workers
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "medrwr_edge.training", "sft", str(cfg), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("two-process training hung (a collective mismatch between ranks?)")
    assert proc.returncode == 0, err[-3000:]
    ckpt = tmp_path / "out" / "checkpoints" / "step-0000002"
    assert out.strip() == str(ckpt)  # printed once, by rank 0
    assert "2 process(es), ddp" in err
    assert {p.name for p in (ckpt / "train_state").glob("rng-rank*.safetensors")} == {
        "rng-rank0.safetensors", "rng-rank1.safetensors"}
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] < rows[0]["loss"]


def test_the_runtime_never_imports_training():
    import re

    root = Path(__file__).resolve().parents[1] / "medrwr_edge"
    pattern = re.compile(r"^\s*(from\s+(\.\.?|medrwr_edge\.)training|import\s+medrwr_edge\.training)", re.M)
    offenders = [str(p.relative_to(root)) for part in ("runtime", "kb_pack", "evidence", "export", "imaging.py")
                 for p in ((root / part).rglob("*.py") if (root / part).is_dir() else [root / part])
                 if pattern.search(p.read_text("utf-8"))]
    assert not offenders, offenders
