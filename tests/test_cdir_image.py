"""CDIR as the paper does it on a vision model: the similar case's image goes into the KV cache with its caption.

Loop logic on the scripted backend (which variant, what the record says), then end to end on the exported tiny
random Qwen2.5-VL bundle: `ask` with an image pack, CDIR forced by a threshold of 1.0, the reference image's
embedding rows in the cache (checked against a direct ONNX call), and rollback identity with a fresh run.
"""

from __future__ import annotations

import numpy as np
import pytest

from medrwr_edge.runtime import protocol as P
from medrwr_edge.runtime.backend import ImageInput, SamplingSettings
from medrwr_edge.runtime.loop import LoopConfig, MedRwRLoop, ReferenceImage
from medrwr_edge.runtime.scripted_backend import ScriptedBackend
from medrwr_edge.evidence.record import EvidenceRecord

OPTIONS = P.parse_options(["A. Pneumonia", "B. Pneumothorax"])
QUERY_IMAGE = ImageInput(pixels=None, sha256="cd" * 32)
REF_PIXELS = np.zeros((28, 28, 3), dtype=np.uint8)


class OneReference:
    def __init__(self, with_image: bool):
        self.with_image = with_image

    def nearest(self, image):
        pixels = ImageInput(REF_PIXELS, "ef" * 32, role="reference") if self.with_image else None
        return ReferenceImage("refs", "1", "ct-7", "Axial CT of the chest, lung window", 0.93, "ef" * 32, pixels)


def _run(vision: bool, with_image: bool = True):
    be = ScriptedBackend(["<answer> A </answer>", "<think> ok </think>\n<answer> B </answer>"],
                         probs={"A": 0.4, "B": 0.9}, has_vision=vision)
    cfg = LoopConfig(sampling=SamplingSettings(max_tokens=400), generation_reserve_tokens=64)
    rec = EvidenceRecord(question="q", options=[], images=[], model={}, packs=[], settings={})
    MedRwRLoop(be, None, OneReference(with_image), cfg).run(rec, "Which finding?", OPTIONS, [QUERY_IMAGE])
    return rec, be


def test_vision_model_is_shown_the_reference_image_in_the_references_layout():
    rec, be = _run(vision=True)
    cdir = rec.cdir()
    assert cdir.model_saw_reference_image and cdir.reference_doc_id == "ct-7"
    assert cdir.reference_image_sha256 == "ef" * 32
    # `<retrieve> <image> {consultation} </retrieve>\n`, the image as Qwen2.5-VL's image span
    assert cdir.block == (P.CDIR_THINK + "<query> consultation from similar medical imaging case </query>"
                          "<retrieve> <|vision_start|><|image_pad|><|vision_end|> Axial CT of the chest, lung window"
                          " </retrieve>\n")
    assert be.cache.count("<image>") == 2  # the query image in the prompt + the reference image in the turn
    assert not any("caption only" in n for n in rec.notes)
    t = rec.tokens
    assert t["decoded"] == t["prompt"] + t["generated"] + t["inserted"] and rec.letter == "B"


def test_text_model_gets_the_caption_only_and_says_so():
    rec, be = _run(vision=False)
    cdir = rec.cdir()
    assert not cdir.model_saw_reference_image and cdir.block == P.cdir_block("Axial CT of the chest, lung window")
    assert "<|vision_start|>" not in cdir.block and "<image>" not in be.cache
    assert any(n.startswith("CDIR: the reference image was given as its caption only (the model has no vision")
               for n in rec.notes)


def test_vision_model_without_a_reference_image_file_gets_the_caption_and_says_why():
    rec, _ = _run(vision=True, with_image=False)
    assert not rec.cdir().model_saw_reference_image
    assert any("the image pack has no image file for it" in n for n in rec.notes)


def test_the_image_pack_retriever_loads_the_reference_pixels(small_image_pack, ct_png):
    from medrwr_edge.imaging import load_image
    from medrwr_edge.kb_pack.pack import Pack
    from medrwr_edge.paths import sha256_file
    from medrwr_edge.runtime.retrieval import PackImageRetriever

    loaded = load_image(ct_png)
    pack = Pack.open(small_image_pack)
    ref = PackImageRetriever(pack).nearest(ImageInput(loaded.pixels, loaded.sha256))
    assert ref is not None and ref.image is not None and ref.image.role == "reference"
    hit = next(h for h in pack.search(ImageInput(loaded.pixels, loaded.sha256), k=3)
               if h.doc_id == ref.doc_id)
    assert ref.image_sha256 == ref.image.sha256 == sha256_file(hit.image_path)  # the very file shown to the model
    assert np.array_equal(ref.image.pixels, load_image(hit.image_path).pixels)


# ------------------------------------------------------------------------------- tiny Qwen2.5-VL bundle, end to end


class _Spy:
    """Wraps the real backend: forces the two answers (the random model knows no protocol; the forced letter
    carries the model's own probability, see forcing.ForcedPasses), and records the prompt parts and every block
    of embeddings decoded, with their positions."""

    def __init__(self, backend):
        from forcing import ForcedPasses

        self.forced = ForcedPasses(backend, {0: "<think> look </think>\n<answer> A </answer>",
                                             1: "<think> similar case </think>\n<answer> A </answer>"})
        self.inner, self.prompt, self.n_prompt, self.embedded = backend, None, 0, []
        real = backend._decode_embeddings_at

        def spy(embd, positions, n_pos, placeholder, logits_last):
            self.embedded.append((np.array(embd), np.array(positions), backend.n_tokens()))
            return real(embd, positions, n_pos, placeholder, logits_last)

        backend._decode_embeddings_at = spy

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def prefill(self, parts):
        self.prompt = list(parts)
        self.n_prompt = self.inner.prefill(parts)
        return self.n_prompt

    def generate(self, settings, stop, on_piece=None):
        return self.forced.generate(settings, stop, on_piece)


@pytest.mark.slow
def test_cdir_puts_the_reference_image_into_the_cache_on_the_tiny_vl_bundle(small_icd_pack, small_image_pack, ct_png):
    from fixtures_qwen import tiny_bundle
    from medrwr_edge.export.bundle import VISION_ONNX  # the backend below is loaded with the fp32 encoder
    from medrwr_edge.export.qwen_vision import onnx_embeds
    from medrwr_edge.imaging import load_image
    from medrwr_edge.kb_pack.pack import Pack
    from medrwr_edge.runtime.api import ask
    from medrwr_edge.runtime.multimodal_backend import load_bundle
    from medrwr_edge.runtime.vision import mrope_positions, preprocess

    bundle = tiny_bundle()
    be = load_bundle(bundle, n_ctx=4096, prefer_int8=False)
    try:
        spy = _Spy(be)
        rec = ask(ct_png, "Which diagnosis fits the image?", ["A. Pneumothorax", "B. Asthma"], packs=[small_icd_pack],
                  image_pack=small_image_pack, backend=spy, max_tokens=8, cdir_threshold=1.0)
        cdir = rec.cdir()
        assert cdir is not None and 0 < cdir.confidence_before < 1, rec.notes
        assert cdir.model_saw_reference_image and cdir.reference_pack == "ref-small"
        assert cdir.block.startswith(P.CDIR_THINK) and "<retrieve> <|vision_start|><|image_pad|><|vision_end|> " \
            + cdir.reference_caption.split()[0] in cdir.block
        assert be.images_seen == 2 and len(spy.embedded) == 2  # the question's image, then the reference's

        # the reference image's rows are what the ONNX encoder gives for the pack's image file, directly
        hit = next(h for h in Pack.open(small_image_pack).search(ImageInput(load_image(ct_png).pixels, ""), k=3)
                   if h.doc_id == cdir.reference_doc_id)
        ref_pixels = load_image(hit.image_path).pixels
        spec = be.spec
        direct = onnx_embeds(bundle / VISION_ONNX, spec, ref_pixels)
        rows, positions, at = spy.embedded[1]
        assert rows.shape == direct.shape and np.abs(rows - direct).max() < 1e-5
        # ... at M-RoPE positions continuing the turn, right after "<retrieve> <|vision_start|>"
        start = be.positions()[at - 1] + 1
        _, grid = preprocess(ref_pixels, spec)  # the reference image's patch grid, as the backend computed it
        assert np.array_equal(positions, mrope_positions(grid, spec, start)[0])
        tokens = be.tokens()
        assert tokens[at - 1] == be.tokenize("<|vision_start|>")[0]
        assert tokens[at : at + rows.shape[0]] == [be.image_pad_token] * rows.shape[0]
        assert tokens[at + rows.shape[0]] == be.tokenize("<|vision_end|>")[0]
        t = rec.tokens
        assert t["decoded"] == t["prompt"] + t["generated"] + t["inserted"]
        assert be.n_tokens() == t["decoded"] - t["rolled_back"]

        # the rows are in the KV cache: the logits after the splice equal those of a sequence built by hand from
        # the same prompt, the same kept turn and the directly computed rows
        after_splice_end = at + rows.shape[0] + len(be.tokenize("<|vision_end|> "
                                                                + P._one_line(cdir.reference_caption)
                                                                + " </retrieve>\n"))
        be.rollback(after_splice_end)
        spliced = be.last_logits()
        be.rollback(spy.n_prompt)  # pass 0 answered: the answering pass began right after the prompt
        rolled_back = (be.tokens(), be.positions(), be.last_logits(), be.save_state())

        # rollback identity: the cache after rolling the CDIR step back equals a fresh run's after its prefill
        be.reset()
        be.prefill(spy.prompt)
        fresh = (be.tokens(), be.positions(), be.last_logits())
        assert rolled_back[0] == fresh[0] and rolled_back[1] == fresh[1]
        assert np.abs(rolled_back[2] - fresh[2]).max() < 1e-4
        # and continues the same: the whole CDIR step decoded on the fresh cache gives the spliced logits
        head = P.CDIR_THINK + P.CDIR_QUERY + "<retrieve> <|vision_start|>"
        be.append_text(head)
        pos, n_pos = mrope_positions(grid, spec, be.positions()[-1] + 1)
        be._decode_embeddings_at(direct, pos, n_pos, be.image_pad_token, True)
        be.append_text("<|vision_end|> " + P._one_line(cdir.reference_caption) + " </retrieve>\n")
        assert be.n_tokens() == after_splice_end
        assert np.abs(be.last_logits() - spliced).max() < 1e-3
        # a different image at that place gives other logits: the check can tell which image is in the cache
        be.restore_state(rolled_back[3])
        be.append_text(head)
        other = onnx_embeds(bundle / VISION_ONNX, spec, ref_pixels[::-1].copy())
        be._decode_embeddings_at(other, pos, n_pos, be.image_pad_token, True)
        be.append_text("<|vision_end|> " + P._one_line(cdir.reference_caption) + " </retrieve>\n")
        assert np.abs(be.last_logits() - spliced).max() > 1e-2
    finally:
        be.close()


def test_append_parts_that_do_not_fit_leave_the_sequence_as_it_was():
    from fixtures_qwen import tiny_f32_gguf, tiny_image, tiny_spec, tiny_vision_onnx
    from medrwr_edge.runtime.llama_backend import ContextFullError
    from medrwr_edge.runtime.multimodal_backend import QwenVLBackend

    with QwenVLBackend(tiny_f32_gguf(), tiny_vision_onnx(), tiny_spec(), n_ctx=256) as be:  # llama.cpp rounds n_ctx up to 256
        be.prefill(["<|im_start|>user\nWhich finding?<|im_end|>\n<|im_start|>assistant\n"])
        counts = lambda: {k: v for k, v in vars(be.stats).items() if k != "decode_calls"}  # noqa: E731 (work done)
        before = (be.tokens(), be.positions(), be.last_logits(), counts())
        with pytest.raises(ContextFullError):
            be.append_parts(["<retrieve> <|vision_start|>", ImageInput(tiny_image(640, 640), ""), "<|vision_end|>"])
        assert (be.tokens(), be.positions()) == before[:2] and counts() == before[3]
        assert np.abs(be.last_logits() - before[2]).max() < 1e-4
        assert be._ctx.kv_positions() == be.positions()[-1] + 1  # nothing of the failed splice left in llama.cpp
