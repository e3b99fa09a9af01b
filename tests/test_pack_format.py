"""Pack format: build -> open -> verify round trip, determinism, tamper detection, encoder lock, bad k."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medrwr_edge.errors import EncoderMismatchError, InputError, IntegrityError
from medrwr_edge.kb_pack.build import build_text_pack
from medrwr_edge.kb_pack.documents import Document
from medrwr_edge.kb_pack.pack import FORMAT_VERSION, Pack, manifest_bytes
from pack_fakes import HashingTextEncoder

TOPICS = [
    ("pneumonia", "Community-acquired pneumonia shows lobar consolidation with air bronchograms on chest X-ray."),
    ("pneumothorax", "Pneumothorax: a visceral pleural line with absent lung markings beyond it."),
    ("effusion", "Pleural effusion blunts the costophrenic angle and forms a meniscus."),
    ("fracture", "A displaced fracture of the humerus shaft needs orthopaedic referral."),
    ("stroke", "Acute ischaemic stroke: hypodensity and loss of grey-white differentiation on CT."),
    ("appendicitis", "Appendicitis: a dilated, non-compressible appendix over 6 mm on ultrasound."),
    ("cardiomegaly", "Cardiomegaly: cardiothoracic ratio above 0.5 on a PA chest radiograph."),
    ("gallstones", "Gallstones cast an acoustic shadow and move with patient position."),
]


def corpus(n: int = 40) -> list[Document]:
    docs = []
    for i in range(n):
        topic, text = TOPICS[i % len(TOPICS)]
        docs.append(Document(id=f"doc-{i:03d}", text=f"{text} Case note {i}.", title=topic.title(), source="test",
                             metadata={"topic": topic, "n": i}))
    return docs


@pytest.fixture
def encoder():
    return HashingTextEncoder()


@pytest.fixture
def built(tmp_path, encoder, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    return build_text_pack(corpus(), tmp_path / "pack", encoder, name="test-kb", version="1.0", progress=False)


def test_round_trip(built, encoder):
    with Pack.open(built, encoder=encoder, verify="full") as pack:
        assert (pack.name, pack.version, pack.kind, pack.doc_count) == ("test-kb", "1.0", "text", 40)
        assert pack.encoder_sha256 == encoder.sha256
        assert pack.manifest["created"] == "2023-11-14T22:13:20Z"
        assert pack.manifest["encoder"]["spec"]["name"] == "hashing-text"
        assert pack.verify() == []
        hits = pack.search("pleural effusion costophrenic angle meniscus", k=3, mode="dense")
        assert len(hits) == 3 and all(h.title == "Effusion" for h in hits)
        assert hits[0].metadata["topic"] == "effusion" and hits[0].source == "test"
        assert [h.ranks["dense"] for h in hits] == [1, 2, 3]
        info = pack.info()
        assert info["schema"] == "medrwr-edge/pack-info/1" and info["doc_count"] == 40
    assert not (built.parent / "pack.partial-work").exists()
    assert sorted(p.name for p in built.iterdir()) == ["docs.sqlite", "index.hnsw", "manifest.json"]


def test_query_vector_search_matches_document_vector(built, encoder):
    with Pack.open(built, encoder=encoder) as pack:
        docs = corpus()
        vec = encoder.embed([docs[17].text])[0]
        hit = pack.search(vec * 3.0, k=1)[0]  # scale must not matter
        assert hit.doc_id == "doc-017" and hit.score == pytest.approx(1.0, abs=1e-5)
        with pytest.raises(InputError, match="query vector has 5 dimensions"):
            pack.search(np.ones(5, dtype=np.float32), k=1)
        with pytest.raises(InputError, match="zero"):
            pack.search(np.zeros(encoder.dim, dtype=np.float32), k=1)


def test_builds_are_byte_identical(tmp_path, encoder, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a = build_text_pack(corpus(), tmp_path / "a", encoder, name="kb", version="1", progress=False)
    b = build_text_pack(corpus(), tmp_path / "b", HashingTextEncoder(), name="kb", version="1", progress=False)
    files_a = sorted(p.name for p in a.iterdir())
    assert files_a == sorted(p.name for p in b.iterdir())
    for name in files_a:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("name", ["index.hnsw", "docs.sqlite"])
def test_flipped_byte_is_detected(built, name):
    path = built / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    Pack.open(built)  # fast open checks sizes only: same size, so it opens
    with pytest.raises(IntegrityError, match=f"{name} has been modified"):
        Pack.open(built, verify="full")
    with Pack.open(built) as pack:
        assert pack.verify() == [f"{name} has been modified (sha256 differs from the manifest)"]


def test_missing_and_truncated_files(built):
    (built / "docs.sqlite").unlink()
    with pytest.raises(IntegrityError, match="docs.sqlite is missing"):
        Pack.open(built)
    idx = built / "index.hnsw"
    idx.write_bytes(idx.read_bytes()[:-10])
    with pytest.raises(IntegrityError, match="docs.sqlite is missing; index.hnsw has .* bytes, manifest says"):
        Pack.open(built)


def test_edited_manifest_is_detected(built):
    path = built / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["doc_count"] = 39
    path.write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="manifest.json was modified"):
        Pack.open(built)
    path.write_text("{not json")
    with pytest.raises(IntegrityError, match="not valid JSON"):
        Pack.open(built)


def test_newer_format_version_is_refused(built):
    path = built / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    path.write_bytes(manifest_bytes(manifest))  # a correctly signed manifest from a newer medrwr-edge
    with pytest.raises(IntegrityError, match=f"has format {FORMAT_VERSION + 1}; this medrwr-edge reads ≤ 1"):
        Pack.open(built)


def test_consistent_but_wrong_manifest_is_caught_by_verify(built):
    path = built / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["doc_count"] = 39  # re-signed: only the content checks can see it
    path.write_bytes(manifest_bytes(manifest))
    with Pack.open(built) as pack:
        problems = pack.verify()
    assert any("docs.sqlite has 40 documents, manifest says 39" in p for p in problems)


def test_encoder_lock(built):
    other = HashingTextEncoder(salt="other")
    with pytest.raises(EncoderMismatchError) as err:
        Pack.open(built, encoder=other)
    locked = HashingTextEncoder().sha256
    assert locked in str(err.value) and other.sha256 in str(err.value)


def test_missing_encoder_is_a_clear_error(built, medrwr_home):
    from medrwr_edge.errors import ModelError

    with Pack.open(built) as pack:  # no encoder given: loaded lazily for the first text query
        with pytest.raises(ModelError, match="needs encoder 'hashing-text'"):
            pack.search("pneumonia", k=1, mode="dense")
        assert pack.search("pneumonia", k=1, mode="lexical")[0].title == "Pneumonia"  # lexical needs no encoder


@pytest.mark.parametrize("k, message", [(0, "k must be at least 1"), (-2, "k must be at least 1"),
                                         (41, "k=41 is more than the 40 documents"), (2.5, "k must be an integer")])
def test_bad_k(built, encoder, k, message):
    with Pack.open(built, encoder=encoder) as pack:
        with pytest.raises(InputError, match=message):
            pack.search("pneumonia", k=k)


def test_bad_queries(built, encoder):
    with Pack.open(built, encoder=encoder) as pack:
        with pytest.raises(InputError, match="query is empty"):
            pack.search("   ", k=1)
        with pytest.raises(InputError, match="unknown search mode"):
            pack.search("x", k=1, mode="magic")
        with pytest.raises(InputError, match="cannot search with a dict"):
            pack.search({"q": 1}, k=1)


def test_open_errors(tmp_path):
    with pytest.raises(InputError, match="pack not found"):
        Pack.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IntegrityError, match="not a knowledge pack"):
        Pack.open(tmp_path / "empty")


def test_k_equal_to_doc_count_returns_everything(built, encoder):
    with Pack.open(built, encoder=encoder) as pack:
        for mode in ("dense", "hybrid"):
            hits = pack.search("fracture", k=40, mode=mode)
            assert len(hits) == 40 and len({h.doc_id for h in hits}) == 40


def test_pack_by_installed_name(medrwr_home, encoder, monkeypatch):
    from medrwr_edge.paths import packs_dir

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    build_text_pack(corpus(10), packs_dir() / "mykb", encoder, name="mykb", version="1", progress=False)
    with Pack.open("mykb") as pack:
        assert pack.doc_count == 10
