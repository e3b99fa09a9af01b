"""End-to-end with the real default encoders (MiniLM text, EfficientNet image) on small real data.

The encoders are installed by `medrwr-edge models install` (CI does it first); without them these tests skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from medrwr_edge.kb_pack.build import build_image_pack, build_text_pack
from medrwr_edge.kb_pack.documents import Document
from medrwr_edge.kb_pack.pack import Pack


def _encoder_dir(kind: str) -> Path:
    from medrwr_edge.errors import MedrwrError

    try:
        from medrwr_edge import assets

        path = Path(getattr(assets, f"default_{kind}_encoder_dir")())
    except (ImportError, AttributeError, MedrwrError) as e:
        pytest.skip(f"medrwr_edge.assets cannot locate the default {kind} encoder ({e})")
    if not (path / "encoder.json").is_file():
        pytest.skip(f"default {kind} encoder not installed at {path}; run `medrwr-edge models install`")
    return path


@pytest.fixture(scope="module")
def text_encoder():
    from medrwr_edge.kb_pack.encoders import load_encoder

    return load_encoder(_encoder_dir("text"), prefer_gpu=False)


@pytest.fixture(scope="module")
def image_encoder():
    from medrwr_edge.kb_pack.encoders import load_encoder

    return load_encoder(_encoder_dir("image"), prefer_gpu=False)


@pytest.fixture(scope="module")
def icd_pack(text_encoder, tmp_path_factory):
    pytest.importorskip("simple_icd_10_cm")
    from medrwr_edge.kb_pack.icd10 import icd10_documents

    # ~100 respiratory codes: pneumonias, pleural disorders and their neighbours (small: embedding is the cost)
    wanted = ("J12", "J13", "J14", "J15", "J18", "J81", "J84", "J90", "J91", "J92", "J93", "J94")
    docs = [d for d in icd10_documents(chapters=[10], include_extensions=False) if d.id.startswith(wanted)]
    path = build_text_pack(docs, tmp_path_factory.mktemp("real") / "icd", text_encoder, name="icd-resp",
                           version="test", progress=False)
    with Pack.open(path, encoder=text_encoder, verify="full") as pack:
        yield pack


def test_real_text_pack_semantic_and_code_queries(icd_pack):
    assert icd_pack.verify() == []
    hits = icd_pack.search("J93.0", k=3)
    assert hits[0].doc_id == "J93.0", [h.doc_id for h in hits]
    dense = icd_pack.search("collapsed lung with air in the pleural space", k=5, mode="dense")
    assert any(h.doc_id.startswith("J93") for h in dense), [h.doc_id for h in dense]
    hybrid = icd_pack.search("bacterial pneumonia caused by Streptococcus pneumoniae", k=3, mode="hybrid")
    assert hybrid[0].doc_id.startswith(("J13", "J15", "J18")), [h.doc_id for h in hybrid]


def test_real_image_pack(image_encoder, tmp_path):
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    from medrwr_edge.imaging import load_image

    docs = []
    for name in ("camera", "chelsea", "coffee", "astronaut", "brick", "moon"):
        img = getattr(skdata, name)()
        path = tmp_path / f"{name}.png"
        Image.fromarray(img).save(path)
        docs.append(Document(id=name, text=f"{name} picture", caption=f"skimage sample '{name}'", image_path=str(path)))
    pack_dir = build_image_pack(docs, tmp_path / "imgpack", image_encoder, name="sk", version="1", progress=False)
    with Pack.open(pack_dir, encoder=image_encoder) as pack:
        # a shrunken, re-encoded copy of an indexed image must find its original first
        query = tmp_path / "query.jpg"
        Image.open(tmp_path / "chelsea.png").convert("RGB").resize((200, 150)).save(query, quality=85)
        hits = pack.search(load_image(query), k=2)
        assert hits[0].doc_id == "chelsea" and hits[0].score > 0.8
        assert Path(hits[0].image_path).is_file()
