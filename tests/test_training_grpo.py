"""GRPO: the loss by hand, rollouts through the runtime loop (splice, masks, KV cache), masked gradients, a real
optimisation step, a reward that rises, stage 2 with a tiny Qwen2.5-VL, and resume giving the same next step."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch", reason="needs the train extra: pip install -e '.[train]'")
pytest.importorskip("transformers", reason="needs the train extra: pip install -e '.[train]'")
pytest.importorskip("accelerate", reason="needs the train extra: pip install -e '.[train]'")

from grpo_fixtures import ScriptedLM, load_tiny, make_text_pack, make_tiny_qwen2_lm  # noqa: E402

from medrwr_edge.kb_pack.pack import Pack  # noqa: E402
from medrwr_edge.runtime import protocol as P  # noqa: E402
from medrwr_edge.runtime.backend import SamplingSettings  # noqa: E402
from medrwr_edge.runtime.protocol import Option  # noqa: E402
from medrwr_edge.runtime.retrieval import PackTextRetriever  # noqa: E402
from medrwr_edge.training.data import McqExample  # noqa: E402
from medrwr_edge.training.grpo import (GRPOConfig, completion_logprobs, group_advantages,  # noqa: E402
                                       grpo_token_loss, logits_to_logprobs, rollout_batch, train_grpo)
from medrwr_edge.training.rollout import HFRolloutBackend, RolloutRunner, RolloutSettings  # noqa: E402

EXAMPLE = McqExample("q1", "Fluid blunting the costophrenic angle?",
                     [Option("A", "Pneumothorax"), Option("B", "Pleural effusion")], "B")
SCRIPT = ["<think> fluid </think>\n<query> pleural effusion </query>", "<think> so B </think>\n<answer> B </answer>"]
MCQ_ROWS = [
    {"question": "Fluid blunting the costophrenic angle?", "options": {"A": "Pneumothorax", "B": "Pleural effusion"},
     "answer_idx": "B"},
    {"question": "Air in the pleural space?", "opa": "Pneumothorax", "opb": "Pleural effusion", "opc": "Atelectasis",
     "opd": "Cardiomegaly", "cop": 1},
]


@pytest.fixture(autouse=True)
def one_thread():
    # The tiny model is faster on one thread, and the machine is shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_qwen2_lm(tmp_path_factory.mktemp("lm") / "tiny-qwen2")


@pytest.fixture(scope="module")
def lm(lm_dir):
    return load_tiny(lm_dir)


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    path, enc = make_text_pack(tmp_path_factory.mktemp("pack") / "tiny-text")
    with Pack.open(path, encoder=enc) as p:
        yield p


def write_mcq(path):
    path.write_text("".join(json.dumps(r) + "\n" for r in MCQ_ROWS), encoding="utf-8")
    return path


# ------------------------------------------------------------------ the loss by hand


def test_group_advantages_by_hand():
    adv = group_advantages(torch.tensor([1.0, 3.0, 0.0, 0.0]), 2, eps=0.0)
    # group 1: mean 2, unbiased std sqrt(2) -> (-1/sqrt2, 1/sqrt2); group 2: equal rewards -> 0 (no signal)
    assert adv.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0, 0.0])


def test_grpo_loss_small_example_by_hand():
    logp = torch.tensor([[math.log(0.5), math.log(0.4)], [math.log(0.2), math.log(0.9)]])
    old = torch.tensor([[math.log(0.25), math.log(0.4)], [math.log(0.4), math.log(0.9)]])
    ref = torch.tensor([[math.log(0.5), math.log(0.2)], [math.log(0.2), math.log(0.9)]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1], [1, 0]])  # the last token is a retrieved one: out of the loss and the KL
    loss, stats = grpo_token_loss(logp, old, ref, adv, mask, epsilon=0.2, beta=0.1)
    # token (0,0): ratio 2 -> clipped to 1.2, A=1: -min(2, 1.2) = -1.2; KL 0
    # token (0,1): ratio 1, A=1: -1; KL = e^(ln .5) - ln .5 - 1 = 0.5 + ln 2 - 1
    # token (1,0): ratio 0.5 -> clip 0.8, A=-2: -min(-1, -1.6) = 1.6; KL 0
    kl01 = 0.5 + math.log(2) - 1
    expected = (-1.2 + (-1 + 0.1 * kl01) + 1.6) / 3
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert stats["tokens"] == 3 and stats["clipped"] == 2 and stats["kl_sum"] == pytest.approx(kl01, abs=1e-6)
    # token-level normalisation: a normaliser for the whole micro-batch makes chunk losses add up
    half, _ = grpo_token_loss(logp[:1], old[:1], ref[:1], adv[:1], mask[:1], epsilon=0.2, beta=0.1, normaliser=3)
    rest, _ = grpo_token_loss(logp[1:], old[1:], ref[1:], adv[1:], mask[1:], epsilon=0.2, beta=0.1, normaliser=3)
    assert float(half + rest) == pytest.approx(expected, abs=1e-6)


def test_clipped_tokens_get_no_gradient():
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    old = torch.tensor([[math.log(0.25)]])  # ratio 2 > 1.2 with A > 0: clipped
    loss, _ = grpo_token_loss(logp, old, None, torch.tensor([1.0]), torch.tensor([[1]]), epsilon=0.2, beta=0.0)
    loss.backward()
    assert float(logp.grad) == 0.0


# ------------------------------------------------------------------ rollouts


def test_rollout_runs_the_runtime_loop_and_masks_the_retrieve_block(lm, pack):
    model, tok = lm
    runner = RolloutRunner(ScriptedLM(model, tok, SCRIPT), tok, text_retriever=PackTextRetriever([pack]),
                           settings=RolloutSettings(max_completion_tokens=400))
    ro = runner.rollout(EXAMPLE)
    docs = [h.text for h in pack.search("pleural effusion", k=3)]
    block = "\n" + P.retrieve_block(docs)
    assert ro.completion_text == SCRIPT[0] + block + SCRIPT[1]
    assert ro.letter == "B" and ro.retrieval_used and ro.queries == ["pleural effusion"]
    assert ro.y_prime == "<think> fluid </think>\n"
    # mask 0 exactly on the spliced block; the model's own tokens (and nothing else) have mask 1
    inserted = [t for t, m in zip(ro.completion_ids, ro.loss_mask) if m == 0]
    sampled = [t for t, m in zip(ro.completion_ids, ro.loss_mask) if m == 1]
    assert tok.decode(inserted) == block
    assert tok.decode(sampled) == SCRIPT[0] + SCRIPT[1]
    first0, last0 = ro.loss_mask.index(0), len(ro.loss_mask) - 1 - ro.loss_mask[::-1].index(0)
    assert all(m == 0 for m in ro.loss_mask[first0 : last0 + 1])  # one contiguous masked block
    # the prompt is the runtime's, byte for byte
    parts = P.chatml_prompt(P.system_prompt(False), P.user_text(EXAMPLE.question, EXAMPLE.options))
    assert tok.decode(ro.prompt_ids) == P.prompt_text(parts)
    # confidence probes: the script forces "B" after <answer> (with retrieval); without it the model is random
    assert ro.logp_gold_with == pytest.approx(0.0, abs=1e-3)
    assert ro.logp_gold_without < -1.0


def test_rollout_query_limit_and_no_pack(lm):
    model, tok = lm
    three_queries = ["<think> a </think>\n<query> x </query>"] * 3
    ro = RolloutRunner(ScriptedLM(model, tok, three_queries), tok,
                       settings=RolloutSettings(max_completion_tokens=400)).rollout(EXAMPLE)
    # no pack: queries are answered with <retrieve> None </retrieve>; the 3rd pass is the last (no 3rd retrieve)
    assert ro.completion_text.count("<retrieve> None </retrieve>") == 2 and ro.completion_text.count("<query>") == 3
    assert not ro.retrieval_used and ro.status == "no-answer" and ro.logp_gold_with is None


def test_kv_cache_continuation_after_the_splice_matches_a_full_forward(lm):
    model, tok = lm
    be = HFRolloutBackend(model, tok, max_completion_tokens=64)
    torch.manual_seed(3)
    be.prefill(P.chatml_prompt(P.system_prompt(False), P.user_text(EXAMPLE.question, EXAMPLE.options)))
    g1 = be.generate(SamplingSettings(temperature=1.0, max_tokens=6), ["</query>"])
    be.append_text("\n" + P.retrieve_block(["Pleural effusion is fluid.", "Air is not fluid."]))
    g2 = be.generate(SamplingSettings(temperature=1.0, max_tokens=6), ["</query>"])

    class Seq:
        prompt_ids, completion_ids, loss_mask, vision_inputs = be.fed[: be.prompt_len], be.completion_ids, be.loss_mask, {}
        input_ids = prompt_ids + completion_ids

    with torch.no_grad():
        logp, mask = completion_logprobs(model, rollout_batch([Seq], 0, "cpu"))
    full = logp[0][mask[0] > 0].exp().tolist()
    assert full == pytest.approx([t.prob for t in g1.tokens + g2.tokens], rel=1e-4, abs=1e-7)


def test_prompt_cache_across_a_group_gives_the_same_rollouts(lm):
    model, tok = lm
    runner = RolloutRunner(model, tok, settings=RolloutSettings(max_completion_tokens=8))
    torch.manual_seed(7)
    cached = runner.group(EXAMPLE, 3)
    assert runner.backend.stats.cached_prompt_tokens == len(cached[0].prompt_ids)
    torch.manual_seed(7)
    fresh = []
    for _ in range(3):
        runner.backend.forget_prefix()
        fresh.append(runner.rollout(EXAMPLE))
    assert [r.completion_ids for r in cached] == [r.completion_ids for r in fresh]


# ------------------------------------------------------------------ gradients


def test_retrieved_tokens_get_exactly_zero_gradient(lm, lm_dir, pack):
    model, tok = lm
    ro = RolloutRunner(ScriptedLM(model, tok, SCRIPT), tok, text_retriever=PackTextRetriever([pack]),
                       settings=RolloutSettings(max_completion_tokens=400, confidence_probes=False)).rollout(EXAMPLE)
    reference, _ = load_tiny(lm_dir)
    with torch.no_grad():  # a reference that differs from the policy, so the KL term has gradient
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = rollout_batch([ro], tok.pad_token_id, "cpu")
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits.retain_grad()
    logp, mask = logits_to_logprobs(logits, batch)
    with torch.no_grad():
        ref_logp, _ = completion_logprobs(reference, batch)
    loss, _ = grpo_token_loss(logp, logp.detach(), ref_logp, torch.tensor([1.5]), mask, beta=0.5)
    loss.backward()
    grad_per_position = logits.grad[0].abs().sum(-1)  # position t predicts token t + 1
    predicts_policy_token = batch["loss_mask"][0, 1:].bool()
    assert float(grad_per_position[:-1][~predicts_policy_token].abs().max()) == 0.0  # prompt + retrieve block
    assert bool((grad_per_position[:-1][predicts_policy_token] > 0).all())
    model.zero_grad()


def test_one_optimisation_step_changes_parameters_and_lowers_the_loss(lm_dir):
    model, tok = load_tiny(lm_dir)
    torch.manual_seed(0)
    rollouts = RolloutRunner(model, tok, settings=RolloutSettings(max_completion_tokens=6)).group(EXAMPLE, 4)
    advantages = group_advantages(torch.tensor([float(len(r.completion_text)) for r in rollouts]), 4)
    assert float(advantages.abs().sum()) > 0
    batch = rollout_batch(rollouts, tok.pad_token_id, "cpu")
    model.train()
    with torch.no_grad():
        old, _ = completion_logprobs(model, batch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    logp, mask = completion_logprobs(model, batch)
    loss0, _ = grpo_token_loss(logp, old, None, advantages, mask, beta=0.0)
    loss0.backward()
    optimizer.step()
    with torch.no_grad():
        logp1, _ = completion_logprobs(model, batch)
        loss1, _ = grpo_token_loss(logp1, old, None, advantages, mask, beta=0.0)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert float(loss1) < float(loss0)


# ------------------------------------------------------------------ the trainer


def _config(tmp_path, lm_dir, **overrides) -> GRPOConfig:
    values = dict(model=str(lm_dir), output_dir=str(tmp_path / "run"), train_file=str(write_mcq(tmp_path / "mcq.jsonl")),
                  max_steps=2, num_generations=2, max_completion_length=4, learning_rate=1e-3, seed=0)
    values.update(overrides)
    return GRPOConfig(**values)


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_grpo_stage1_with_a_pack(tmp_path, lm_dir, pack):
    config = _config(tmp_path, lm_dir, packs=[str(pack.path)], search_mode="lexical", max_steps=1)
    last = train_grpo(config, quiet=True)
    assert (last / "model.safetensors").is_file() and (last / "tokenizer.json").is_file()
    row = _metrics(tmp_path / "run")[0]
    for key in ("loss", "reward", "kl", "accuracy", "format_ok", "retrieval_rate", "rollout_tokens_per_s",
                "optimise_tokens_per_s", "reward_format", "reward_accuracy"):
        assert key in row
    from medrwr_edge.training.engine import TRAIN_STATE

    hashes = json.loads((last / TRAIN_STATE / "data_hashes.json").read_text())
    assert str(pack.path / "manifest.json") in hashes  # a changed pack blocks resuming like changed data


def test_resume_gives_the_same_next_step(tmp_path, lm_dir):
    def reward(ro, ex):  # varies with the sampled text, so every step moves the weights
        return float(len(ro.completion_text))

    (tmp_path / "a").mkdir()
    straight = _config(tmp_path / "a", lm_dir, save_every=1)
    train_grpo(straight, quiet=True, reward_fn=reward)
    (tmp_path / "b").mkdir()
    first = _config(tmp_path / "b", lm_dir, save_every=1, max_steps=1)
    train_grpo(first, quiet=True, reward_fn=reward)
    resumed = _config(tmp_path / "b", lm_dir, save_every=1, max_steps=2)
    train_grpo(resumed, quiet=True, reward_fn=reward)
    a, b = _metrics(tmp_path / "a" / "run"), _metrics(tmp_path / "b" / "run")
    assert [r["step"] for r in b] == [1, 2]
    assert a[0]["grad_norm"] > 0 and a[1]["kl"] > 0  # the first step did change the policy
    for key in ("loss", "reward", "completion_tokens", "kl", "grad_norm"):
        assert a[1][key] == b[1][key], key
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "run" / "checkpoints" / "step-0000002" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "run" / "checkpoints" / "step-0000002" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_config_validation(tmp_path, lm_dir):
    from medrwr_edge.errors import InputError

    for bad in ({"stage": 3}, {"num_generations": 1}, {"epsilon": 1.5}, {"max_completion_length": 0}):
        with pytest.raises(InputError):
            _config(tmp_path, lm_dir, **bad).validate()


@pytest.mark.slow
def test_reward_rises_on_a_synthetic_format_task(tmp_path, lm_dir):
    """Reward 1 when the completion opens a protocol tag ('<'): rare at first (~15%), learnt in ~20 steps."""
    config = _config(tmp_path, lm_dir, max_steps=20, num_generations=8, max_completion_length=6, learning_rate=1e-2,
                     batch_size=1)
    train_grpo(config, quiet=True, reward_fn=lambda ro, ex: float("<" in ro.completion_text))
    rewards = [r["reward"] for r in _metrics(tmp_path / "run")]
    early, late = sum(rewards[:5]) / 5, sum(rewards[-4:]) / 4
    assert early < 0.5 and late > early + 0.4, rewards


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    from fixtures_qwen import make_tiny_qwen25vl

    from medrwr_edge.training.modeling import load_model

    path = make_tiny_qwen25vl(tmp_path_factory.mktemp("vl") / "tiny-qwen25vl")
    return path, load_model(path, for_training=False)


def test_multimodal_rollout_splices_retrieval_and_keeps_mrope_positions(tiny_vl, pack):
    from fixtures_qwen import tiny_image

    from medrwr_edge.runtime.backend import ImageInput

    _, lm = tiny_vl
    image = ImageInput(tiny_image(), "sha")
    runner = RolloutRunner(ScriptedLM(lm.model, lm.tokenizer, SCRIPT), lm.tokenizer, vision_spec=lm.vision_spec,
                           text_retriever=PackTextRetriever([pack]), settings=RolloutSettings(max_completion_tokens=400))
    ro = runner.rollout(EXAMPLE, [image])
    assert ro.completion_text.startswith(SCRIPT[0] + "\n<retrieve> (1) ") and ro.completion_text.endswith(SCRIPT[1])
    assert ro.vision_inputs["image_grid_thw"].shape == (1, 3) and ro.retrieval_used
    assert ro.logp_gold_with == pytest.approx(0.0, abs=1e-3) and ro.logp_gold_without < -1.0
    # the real model: generation through the KV cache (image prefill, splice, continue) = one full forward
    be = HFRolloutBackend(lm.model, lm.tokenizer, vision_spec=lm.vision_spec, max_completion_tokens=64)
    torch.manual_seed(1)
    be.prefill(P.chatml_prompt(P.system_prompt(True), P.user_text(EXAMPLE.question, EXAMPLE.options), [image],
                               vision=True))
    g1 = be.generate(SamplingSettings(temperature=1.0, max_tokens=5), ["</query>"])
    be.append_text("\n" + P.retrieve_block(["Pleural effusion is fluid."]))
    g2 = be.generate(SamplingSettings(temperature=1.0, max_tokens=5), ["</query>"])

    class Seq:
        prompt_ids, completion_ids, loss_mask, vision_inputs = (be.fed[: be.prompt_len], be.completion_ids,
                                                                be.loss_mask, be.vision_inputs)
        input_ids = prompt_ids + completion_ids

    with torch.no_grad():
        logp, mask = completion_logprobs(lm.model, rollout_batch([Seq], 0, "cpu"))
    full = logp[0][mask[0] > 0].exp().tolist()
    assert full == pytest.approx([t.prob for t in g1.tokens + g2.tokens], rel=1e-4, abs=1e-7)


@pytest.mark.slow
def test_stage2_multimodal_with_a_tiny_qwen25vl(tmp_path, tiny_vl, pack):
    from training_helpers import write_image

    vl, _ = tiny_vl
    write_image(tmp_path / "x.png")
    rows = [dict(MCQ_ROWS[0], image="x.png"), dict(MCQ_ROWS[1], image="x.png")]
    (tmp_path / "mm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = GRPOConfig(model=str(vl), output_dir=str(tmp_path / "run"), train_file=str(tmp_path / "mm.jsonl"),
                        stage=2, max_steps=1, num_generations=2, max_completion_length=4, packs=[str(pack.path)],
                        search_mode="lexical")
    last = train_grpo(config, quiet=True)
    row = _metrics(tmp_path / "run")[0]
    assert "reward_query_semantic" in row and "reward_confidence_gain" in row
    assert (last / "model.safetensors").is_file() and (last / "preprocessor_config.json").is_file()


def test_example_configs_load(tmp_path):
    from pathlib import Path

    from medrwr_edge.training.config import load_config

    root = Path(__file__).resolve().parent.parent / "examples" / "train"
    one = load_config(root / "grpo-stage1.yaml", GRPOConfig)
    two = load_config(root / "grpo-stage2.yaml", GRPOConfig)
    assert (one.stage, one.num_generations, one.beta, one.max_completion_length) == (1, 8, 1e-3, 4096)
    assert two.stage == 2 and two.reward_weights.confidence_gain == 5.0 and not two.reward_options.length_penalty
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\noutput_dir: o\ntrain_file: t\nreward_weights: {acuracy: 5}\n")
    from medrwr_edge.errors import InputError

    with pytest.raises(InputError, match="unknown key 'acuracy'"):
        load_config(bad, GRPOConfig)


def test_a_token_running_past_the_stop_string_is_cut_back(lm_dir, pack):
    """The runtime's rollback: when one sampled token spans `</query>` and more, the cache and the completion end
    exactly at `</query>` (the token is replaced by the tokens of the text up to it, still the model's own)."""
    model, tok = load_tiny(lm_dir)
    tok.add_tokens([">\n\nX"])  # one token crossing the stop string (real vocabularies have such merges)
    model.resize_token_embeddings(len(tok))
    script = ["<think> a </think>\n<query> pleural effusion </query>\n\nX", "<think> b </think>\n<answer> B </answer>"]
    runner = RolloutRunner(ScriptedLM(model, tok, script), tok, text_retriever=PackTextRetriever([pack]),
                           settings=RolloutSettings(max_completion_tokens=400, confidence_probes=False))
    generations, generate = [], runner.backend.generate
    runner.backend.generate = lambda *a, **k: generations.append(generate(*a, **k)) or generations[-1]
    ro = runner.rollout(EXAMPLE)
    assert generations[0].overshoot_chars == 3 and generations[0].stop_string == "</query>"
    crossing = tok.convert_tokens_to_ids(">\n\nX")
    assert crossing not in ro.completion_ids
    first_pass = "<think> a </think>\n<query> pleural effusion </query>"
    assert ro.completion_text.startswith(first_pass + "\n<retrieve> (1) ")
    sampled = [t for t, m in zip(ro.completion_ids, ro.loss_mask) if m == 1]
    assert tok.decode(sampled).startswith(first_pass + "<think> b </think>")
    pass0 = ro.record.passes[0]
    assert pass0.stop_reason == "stop"


def test_backend_rollback_resumes_from_the_kept_prefix(lm):
    model, tok = lm
    be = HFRolloutBackend(model, tok, max_completion_tokens=32)
    be.prefill(P.chatml_prompt(P.system_prompt(False), P.user_text(EXAMPLE.question, EXAMPLE.options)))
    greedy = SamplingSettings(temperature=0.0, max_tokens=6)
    first = [t.token_id for t in be.generate(greedy, ["</query>"]).tokens]
    be.rollback(be.n_tokens() - 3)
    assert be.completion_ids == first[:3] and be.stats.rolled_back_tokens == 3
    again = [t.token_id for t in be.generate(SamplingSettings(temperature=0.0, max_tokens=3), ["</query>"]).tokens]
    assert again == first[3:]


@pytest.mark.slow
def test_two_processes_ddp_stage1_with_a_vision_model(tmp_path, tiny_vl, pack):
    """GRPO under torchrun (DDP over gloo on CPU): rollouts of different lengths on each rank, the loss in chunks
    (no_sync for all but the last), and a vision model on text-only questions (the vision anchor) do not hang."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    vl, _ = tiny_vl
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": str(vl), "output_dir": str(tmp_path / "out"), "train_file": str(write_mcq(tmp_path / "mcq.jsonl")),
        "stage": 1, "packs": [str(pack.path)], "search_mode": "lexical", "num_generations": 2,
        "max_completion_length": 6, "max_steps": 2, "logprob_batch_size": 1, "distributed": "ddp"}))
    # --standalone: a free port for the rendezvous (--master_port 0 hangs the workers with torch 2.13 here)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "medrwr_edge.training", "grpo", str(cfg), "--quiet"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es), ddp" in proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (tmp_path / "out" / "checkpoints" / "step-0000002" / "model.safetensors").is_file()
