"""The system-prompt prefix cache: restored KV state gives the same tokens as computing it."""

from __future__ import annotations

import pytest

from medrwr_edge.runtime import protocol as P
from medrwr_edge.runtime.backend import SamplingSettings

pytestmark = pytest.mark.real_model


def _run(gguf, cache_dir, question):
    from medrwr_edge.runtime.llama_backend import LlamaBackend

    be = LlamaBackend(str(gguf), n_ctx=2048, n_threads=1, prefix_cache_dir=str(cache_dir))
    try:
        be.reset()
        be.prefill(P.chatml_prompt(P.SYSTEM_PROMPT_TEXT, question))
        gen = be.generate(SamplingSettings(max_tokens=24), ["</answer>"])
        return gen.text, be.stats, be.n_tokens()
    finally:
        be.close()


def test_cached_system_prompt_gives_identical_output(smoke_gguf, tmp_path):
    cold_text, cold, n_cold = _run(smoke_gguf, tmp_path, "What is a pneumothorax?\nA. air\nB. fluid")
    assert cold.cached_prompt_tokens == 0 and list(tmp_path.glob("*.kv"))
    warm_text, warm, n_warm = _run(smoke_gguf, tmp_path, "What is a pneumothorax?\nA. air\nB. fluid")
    assert warm.cached_prompt_tokens > 100  # the whole system turn came from disk
    assert warm.prompt_tokens == cold.prompt_tokens - warm.cached_prompt_tokens
    assert warm_text == cold_text and n_warm == n_cold
    # another question reuses the same system turn
    _, other, _ = _run(smoke_gguf, tmp_path, "Which organ makes insulin?\nA. pancreas\nB. liver")
    assert other.cached_prompt_tokens == warm.cached_prompt_tokens


def test_damaged_cache_entry_is_recomputed(smoke_gguf, tmp_path):
    text, _, _ = _run(smoke_gguf, tmp_path, "Q?\nA. x\nB. y")
    for f in tmp_path.glob("*.kv"):
        f.write_bytes(b"garbage")
    again, stats, _ = _run(smoke_gguf, tmp_path, "Q?\nA. x\nB. y")
    assert again == text and stats.cached_prompt_tokens == 0


def test_a_state_from_another_setup_is_never_restored(smoke_gguf, tmp_path):
    """The key covers what decides the KV bytes: a state saved with another n_batch (or device, offload, flash
    attention, KV type, llama.cpp build) is not found, so it is computed instead of restored."""
    from medrwr_edge.runtime.llama_backend import LlamaBackend, PrefixCache
    from medrwr_edge.runtime.llama_native import build_id

    question = "What is a pneumothorax?\nA. air\nB. fluid"
    _run(smoke_gguf, tmp_path, question)  # n_batch 512: stored
    be = LlamaBackend(str(smoke_gguf), n_ctx=2048, n_batch=256, n_threads=1, prefix_cache_dir=str(tmp_path))
    try:
        identity = be.kv_identity()
        be.prefill(P.chatml_prompt(P.SYSTEM_PROMPT_TEXT, question))
        assert be.stats.cached_prompt_tokens == 0  # another n_batch: not the stored state
    finally:
        be.close()
    assert len(list(tmp_path.glob("*.kv"))) == 2
    import llama_cpp

    assert identity["build"] == build_id() and llama_cpp.__version__ in identity["build"]
    assert identity["n_batch"] == identity["n_ubatch"] == 256 and identity["flash_attn"] is False
    assert identity["device"] == "cpu" and identity["gpu_layers"] == 0 and identity["kv_type"]
    tokens = [1, 2, 3]
    variants = [dict(identity, **{k: v}) for k, v in (("device", "cuda"), ("gpu_layers", -1), ("n_batch", 512),
                                                      ("n_ubatch", 512), ("flash_attn", True), ("kv_type", "k:8 v:8"),
                                                      ("build", "llama-cpp-python 0.3.99"), ("model_sha256", "0" * 64))]
    keys = {PrefixCache.key(v, tokens) for v in variants} | {PrefixCache.key(identity, tokens)}
    assert len(keys) == len(variants) + 1
