"""The multimodal backend: ONNX vision embeddings in a llama.cpp batch with M-RoPE positions, vs torch."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fixtures_qwen import (
    tiny_bundle,
    tiny_checkpoint,
    tiny_f32_gguf,
    tiny_image,
    tiny_spec,
    tiny_torch_model,
    tiny_vision_onnx,
)
from forcing import ForcedPasses
from medrwr_edge.errors import IntegrityError, ModelError
from medrwr_edge.runtime.backend import GeneratedToken, Generation, ImageInput, SamplingSettings
from medrwr_edge.runtime.vision import VisionSpec, mrope_positions

ATOL = 1e-2
HEAD = "<|im_start|>user\n"
TAIL = "What does the study show? A. mass B. effusion<|im_end|>\n<|im_start|>assistant\n<think>"


def test_mrope_positions_follow_llama_cpp_layout():
    spec = VisionSpec(hidden_size=32, num_heads=2, out_hidden_size=64)
    pos, n_pos = mrope_positions((1, 8, 12), spec, start=5)  # merged grid 4 x 6
    assert pos.shape == (4, 24) and n_pos == 6
    assert (pos[0] == 5).all() and (pos[3] == 0).all()
    assert pos[1].tolist() == [5 + r for r in range(4) for _ in range(6)]  # row (y)
    assert pos[2].tolist() == [5 + c for _ in range(4) for c in range(6)]  # column (x)


@pytest.fixture(scope="module")
def backend():
    from medrwr_edge.runtime.multimodal_backend import QwenVLBackend

    be = QwenVLBackend(tiny_f32_gguf(), tiny_vision_onnx(), tiny_spec(), n_ctx=2048)
    yield be
    be.close()


def _parts(images):
    parts: list = [HEAD]
    for img in images:
        parts += ["<|vision_start|>", ImageInput(img, "0" * 64), "<|vision_end|>"]
    return parts + [TAIL]


def _torch_logits(images):
    from transformers import AutoTokenizer

    from medrwr_edge.export.parity import torch_image_logits

    ck = tiny_checkpoint()
    return torch_image_logits(tiny_torch_model(), AutoTokenizer.from_pretrained(ck), ck, images, HEAD, TAIL)


def test_two_images_and_text_match_torch_and_wrong_positions_do_not(backend):
    images = [tiny_image(300, 220, 1), tiny_image(200, 260, 2)]
    ref = _torch_logits(images)
    backend.reset()
    backend.prefill(_parts(images))
    out = backend.last_logits()[: ref.shape[0]]
    assert np.abs(out - ref).max() < ATOL and out.argmax() == ref.argmax()
    # text after each image continues at start + max(merged h, merged w), not start + n_image_tokens
    pos = backend.positions()
    assert backend.n_tokens() == len(pos) and pos[-1] < backend.n_tokens() - 1
    # negative control: the same embeddings with 1-D positions
    backend.reset()
    backend.one_d_positions = True
    try:
        backend.prefill(_parts(images))
        wrong = backend.last_logits()[: ref.shape[0]]
    finally:
        backend.one_d_positions = False
    assert np.abs(wrong - ref).max() > 10 * ATOL


def test_rollback_and_append_after_an_image_equal_a_fresh_run(backend):
    greedy = SamplingSettings(temperature=0.0, max_tokens=5)
    img = tiny_image(280, 280, 4)
    backend.reset()
    n = backend.prefill(_parts([img]))
    backend.generate(greedy, stop=[])
    backend.rollback(n)
    backend.append_text(" <query> effusion </query>")
    after_rollback = backend.last_logits()
    backend.reset()
    backend.prefill(_parts([img]))
    backend.append_text(" <query> effusion </query>")
    fresh = backend.last_logits()
    assert np.abs(after_rollback - fresh).max() < 1e-3
    backend.append_text(" <answer>")
    fresh_more = backend.last_logits()
    backend.rollback(backend.n_tokens() - len(backend.tokenize(" <answer>")))
    state = backend.save_state()
    backend.generate(greedy, stop=[])
    backend.restore_state(state)
    assert np.abs(backend.last_logits() - fresh).max() < 1e-3
    # the restored KV cache carries the image's M-RoPE positions: decoding after it gives the same logits
    backend.append_text(" <answer>")
    assert np.abs(backend.last_logits() - fresh_more).max() < 1e-3


def test_rollback_inside_an_image_is_refused(backend):
    backend.reset()
    backend.prefill(_parts([tiny_image(112, 112)]))
    first_image_token = backend.tokens().index(backend.image_pad_token)
    with pytest.raises(ValueError, match="cut an image in half"):
        backend.rollback(first_image_token + 1)


def test_text_only_gguf_is_refused_as_vision_decoder(smoke_gguf):
    from medrwr_edge.runtime.multimodal_backend import QwenVLBackend

    with pytest.raises(ModelError, match="not an M-RoPE"):
        QwenVLBackend(smoke_gguf, tiny_vision_onnx(), tiny_spec(), n_ctx=512)


# ------------------------------------------------------------------------------------------ the bundle


@pytest.mark.slow
def test_med_rwr_loop_runs_unchanged_on_the_bundle(small_icd_pack, ct_png):
    from medrwr_edge.runtime.api import ask
    from medrwr_edge.runtime.multimodal_backend import load_bundle

    be = load_bundle(tiny_bundle(), n_ctx=4096)
    assert be.info.has_vision and be.info.name == "llama.cpp+onnx-vision"
    forced = ForcedPasses(be, {0: "<think> air in the pleural space </think>\n<query> pneumothorax </query>",
                          1: " </think>\n<answer>"})
    rec = ask([ct_png, ct_png], "Which diagnosis fits the image?", ["A. Pneumothorax", "B. Asthma"],
              packs=[small_icd_pack], backend=forced, max_tokens=8, cdir=False)
    r = rec.retrievals()[0]
    assert r.query == "pneumothorax" and len(r.docs) == 3
    assert be.images_seen == 2  # both the prior and the current study went through the vision encoder
    assert not any("no vision input" in n for n in rec.notes)
    t = rec.tokens
    assert t["decoded"] == t["prompt"] + t["generated"] + t["inserted"]
    assert be.n_tokens() == t["decoded"] - t["rolled_back"]
    json.dumps(rec.to_dict())
    be.close()


class _ForcedLetter(ForcedPasses):
    """Every pass answers with option A, carrying the probability the real (vision) model gives "A" there."""

    def generate(self, settings, stop, on_piece=None):
        be = self.inner
        be.append_text(" </think>\n<answer> ")
        logits = be.last_logits().astype(np.float64)
        letter = be.tokenize("A")[0]
        prob = float(np.exp(logits[letter] - logits.max()) / np.exp(logits - logits.max()).sum())
        be.append_text("A </answer>")
        text = " </think>\n<answer> A </answer>"
        tokens = [GeneratedToken(-1, " </think>\n<answer>", 1.0), GeneratedToken(-1, " ", 1.0),
                  GeneratedToken(letter, "A", prob),
                  GeneratedToken(-1, " </answer>", 1.0)]
        return Generation(text, tokens, "stop", "</answer>")


@pytest.mark.slow
def test_cdir_rolls_back_and_splices_on_the_bundle(small_icd_pack, small_image_pack, ct_png):
    from medrwr_edge.runtime.api import ask
    from medrwr_edge.runtime.multimodal_backend import load_bundle

    be = load_bundle(tiny_bundle(), n_ctx=4096)
    rec = ask(ct_png, "Which diagnosis fits the image?", ["A. Pneumothorax", "B. Asthma"], packs=[small_icd_pack],
              image_pack=small_image_pack, backend=_ForcedLetter(be, {}), max_tokens=6, cdir_threshold=1.0)
    cdir = rec.cdir()
    assert cdir is not None, (rec.notes, rec.letter, rec.confidence, [type(s).__name__ for s in rec.steps])
    assert 0.0 < cdir.confidence_before < 1.0 and cdir.reference_pack == "ref-small"
    t = rec.tokens
    assert t["rolled_back"] > 0 and be.n_tokens() == t["decoded"] - t["rolled_back"]
    # the question's image, then CDIR's reference image (issue 18: a vision model sees the similar case)
    assert rec.letter == "A" and be.images_seen == 2 and cdir.model_saw_reference_image
    be.close()


@pytest.mark.slow
def test_truncated_or_swapped_bundle_files_are_refused(tmp_path):
    from medrwr_edge.runtime.multimodal_backend import load_bundle

    src = tiny_bundle()
    m = json.loads((src / "manifest.json").read_text())
    b1 = shutil.copytree(src, tmp_path / "truncated")
    onnx = b1 / m["vision_encoder"]
    onnx.write_bytes(onnx.read_bytes()[:-100])
    with pytest.raises(IntegrityError, match="truncated or replaced"):
        load_bundle(b1)
    b2 = shutil.copytree(src, tmp_path / "swapped")
    text = b2 / m["text_model"]
    data = bytearray(text.read_bytes())
    data[-10] ^= 0xFF  # same size, different content
    text.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        load_bundle(b2)


@pytest.mark.slow
def test_mmproj_path_loads_and_answers():
    import base64
    import io

    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Qwen25VLChatHandler
    from PIL import Image

    bundle = tiny_bundle()
    m = json.loads((bundle / "manifest.json").read_text())
    buf = io.BytesIO()
    Image.fromarray(tiny_image(300, 220)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    handler = Qwen25VLChatHandler(clip_model_path=str(bundle / m["mmproj"]), verbose=False)
    llm = Llama(str(bundle / m["text_model"]), chat_handler=handler, n_ctx=2048, verbose=False, seed=0)
    question = {"type": "text", "text": "What does the study show?"}
    with_image = llm.create_chat_completion(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": uri}}, question]}], max_tokens=4, temperature=0)
    llm.reset()
    text_only = llm.create_chat_completion(messages=[{"role": "user", "content": [question]}], max_tokens=4,
                                           temperature=0)
    llm.close()
    assert with_image["usage"]["completion_tokens"] >= 1
    assert isinstance(with_image["choices"][0]["message"]["content"], str)
    # llama-cpp-python counts positions: 300x220 -> merged grid 8 x 11 takes max(8, 11) = 11 M-RoPE positions
    # (the same rule as the ONNX path), plus <|vision_start|> and <|vision_end|>
    assert with_image["usage"]["prompt_tokens"] - text_only["usage"]["prompt_tokens"] == 11 + 2
