"""Builders: bad input, Ctrl-C leaves no pack and resume completes, image packs, diff."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medrwr_edge.errors import InputError, IntegrityError
from medrwr_edge.kb_pack.build import build_image_pack, build_text_pack, work_dir_for
from medrwr_edge.kb_pack.diff import diff_packs
from medrwr_edge.kb_pack.documents import Document
from medrwr_edge.kb_pack.pack import Pack
from pack_fakes import ColorHistogramEncoder, HashingTextEncoder


def docs(n: int, prefix: str = "d") -> list[Document]:
    return [Document(id=f"{prefix}{i}", text=f"finding number {i} in the {['lung', 'liver', 'brain'][i % 3]}")
            for i in range(n)]


def test_duplicate_ids_are_named(tmp_path):
    bad = docs(5) + [Document(id="d3", text="again")]
    with pytest.raises(InputError, match="duplicate document id 'd3'"):
        build_text_pack(bad, tmp_path / "p", HashingTextEncoder(), name="p", version="1", progress=False)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("documents, message", [
    ([], "the source has no documents"),
    ([Document(id="", text="x")], "empty id"),
    ([Document(id="a", text="   ")], "document 'a' has no text"),
    ([Document(id="a", text="x", metadata={"bad": object()})], "metadata that is not plain JSON"),
])
def test_bad_documents(tmp_path, documents, message):
    with pytest.raises(InputError, match=message):
        build_text_pack(documents, tmp_path / "p", HashingTextEncoder(), name="p", version="1", progress=False)
    assert list(tmp_path.iterdir()) == [] or not (tmp_path / "p").exists()


def test_bad_names_and_existing_output(tmp_path):
    enc = HashingTextEncoder()
    with pytest.raises(InputError, match="pack name '../x'"):
        build_text_pack(docs(3), tmp_path / "p", enc, name="../x", version="1", progress=False)
    with pytest.raises(InputError, match="unknown search mode"):
        build_text_pack(docs(3), tmp_path / "p", enc, name="p", version="1", search_mode="fuzzy", progress=False)
    build_text_pack(docs(3), tmp_path / "p", enc, name="p", version="1", progress=False)
    with pytest.raises(InputError, match="already exists"):
        build_text_pack(docs(4), tmp_path / "p", enc, name="p", version="2", progress=False)
    build_text_pack(docs(4), tmp_path / "p", enc, name="p", version="2", overwrite=True, progress=False)
    assert Pack.open(tmp_path / "p").doc_count == 4
    with pytest.raises(InputError, match="needs a text encoder"):
        build_text_pack(docs(3), tmp_path / "q", ColorHistogramEncoder(), name="q", version="1", progress=False)


def test_interrupted_build_leaves_no_pack_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    out = tmp_path / "kb"
    flaky = HashingTextEncoder(fail_after_calls=3)  # Ctrl-C during the 4th batch
    with pytest.raises(KeyboardInterrupt):
        build_text_pack(docs(100), out, flaky, name="kb", version="1", progress=False, batch_size=10)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["kb.partial-work"]
    saved = sorted(p.name for p in work_dir_for(out).glob("batch-*.npy"))
    assert saved == ["batch-000000.npy", "batch-000001.npy", "batch-000002.npy"]

    resumed = HashingTextEncoder()
    build_text_pack(docs(100), out, resumed, name="kb", version="1", progress=False, batch_size=10)
    assert resumed.calls == 7  # only the 7 missing batches were embedded
    assert not work_dir_for(out).exists()
    fresh = build_text_pack(docs(100), tmp_path / "fresh", HashingTextEncoder(), name="kb", version="1",
                            progress=False, batch_size=10)
    for name in ("index.hnsw", "docs.sqlite", "manifest.json"):
        assert (out / name).read_bytes() == (fresh / name).read_bytes()


def test_checkpoints_from_other_inputs_are_discarded(tmp_path):
    out = tmp_path / "kb"
    with pytest.raises(KeyboardInterrupt):
        build_text_pack(docs(50), out, HashingTextEncoder(fail_after_calls=2), name="kb", version="1",
                        progress=False, batch_size=10)
    enc = HashingTextEncoder()
    build_text_pack(docs(50, prefix="other"), out, enc, name="kb", version="1", progress=False, batch_size=10)
    assert enc.calls == 5
    with Pack.open(out) as pack:
        assert pack.document_hashes().keys() == {f"other{i}" for i in range(50)}


def _png(path, color, size=(700, 300)):
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[...] = color
    arr[: size[1] // 4, : size[0] // 4] = (255 - np.array(color)).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return str(path)


def test_image_pack_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    colors = {"red": (200, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 200)}
    image_docs = [Document(id=f"ref/{name}", text=f"{name} reference", caption=f"A {name} reference image",
                           image_path=_png(tmp_path / f"{name}.png", c)) for name, c in colors.items()]
    enc = ColorHistogramEncoder()
    path = build_image_pack(image_docs, tmp_path / "imgs", enc, name="imgs", version="1", progress=False)
    again = build_image_pack(image_docs, tmp_path / "imgs2", enc, name="imgs", version="1", progress=False)
    pngs = sorted((path / "images").iterdir())
    assert len(pngs) == 3
    assert [(p.name, p.read_bytes()) for p in pngs] == [(p.name, p.read_bytes()) for p in sorted((again / "images").iterdir())]
    with Image.open(pngs[0]) as im:
        assert max(im.size) == 512
    from medrwr_edge.imaging import load_image

    with Pack.open(path, encoder=enc, verify="full") as pack:
        assert pack.kind == "image" and pack.verify() == []
        hit = pack.search(load_image(tmp_path / "green.png"), k=1)[0]
        assert hit.doc_id == "ref/green" and hit.caption == "A green reference image"
        assert hit.image_path and hit.image_path.endswith(".png") and (path / "images").resolve().as_posix() in hit.image_path
        assert pack.search("blue", k=1)[0].doc_id == "ref/blue"  # text on an image pack searches captions
        with pytest.raises(InputError, match="needs an image for dense search"):
            pack.search("blue", k=1, mode="dense")
    # an altered thumbnail, then a stray one, are caught
    png = pngs[1]
    data = bytearray(png.read_bytes())
    data[-20] ^= 0x01
    png.write_bytes(bytes(data))
    with Pack.open(path) as pack:
        assert pack.verify() == [f"images/{png.name} has been modified (sha256 differs from the manifest)"]
    png.write_bytes(bytes(data[:-20]) + bytes([data[-20] ^ 0x01]) + bytes(data[-19:]))
    (path / "images" / "extra.png").write_bytes(b"x")
    with Pack.open(path) as pack:
        assert pack.verify() == ["images/extra.png is not listed in the manifest"]
    (path / "images" / "extra.png").unlink()
    pngs[0].unlink()
    with pytest.raises(IntegrityError, match=f"images/{pngs[0].name} is missing"):
        Pack.open(path)


def test_image_pack_rejects_bad_images(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(InputError):
        build_image_pack([Document(id="x", text="c", caption="c", image_path=str(bad))], tmp_path / "p",
                         ColorHistogramEncoder(), name="p", version="1", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.png"]  # no pack, no empty work dir


def test_diff(tmp_path):
    enc = HashingTextEncoder()
    old_docs = docs(6)
    new_docs = old_docs[:3] + [Document(id="d4", text="edited text"), Document(id="d9", text="new one")]
    # d3 and d5 removed, d4 changed, d9 added
    new_docs = [d for d in new_docs if d.id not in ("d3", "d5")]
    old = build_text_pack(old_docs, tmp_path / "old", enc, name="kb", version="1", progress=False)
    new = build_text_pack(new_docs, tmp_path / "new", enc, name="kb", version="2", progress=False)
    d = diff_packs(old, new)
    assert (d.added, d.removed, d.changed, d.unchanged) == (["d9"], ["d3", "d5"], ["d4"], 3)
    assert not d.encoder_changed and not d.identical
    assert d.to_dict()["schema"] == "medrwr-edge/pack-diff/1"
    assert diff_packs(old, old).identical
    other = build_text_pack(old_docs, tmp_path / "other", HashingTextEncoder(salt="x"), name="kb", version="3",
                            progress=False)
    assert diff_packs(old, other).encoder_changed
