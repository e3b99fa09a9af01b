"""Source readers and chunking: strict UTF-8, line numbers in errors, stable ids."""

from __future__ import annotations

import pytest

from medrwr_edge.errors import InputError
from medrwr_edge.kb_pack.sources import (
    chunk_documents,
    chunk_words,
    read_csv,
    read_folder,
    read_image_captions,
    read_jsonl,
    read_text_source,
)
from medrwr_edge.kb_pack.documents import Document


def test_jsonl_reads_fields_and_derives_ids(tmp_path):
    p = tmp_path / "kb.jsonl"
    p.write_text('{"id": "a", "text": "alpha", "title": "A", "source": "s"}\n\n{"text": "beta"}\n', encoding="utf-8")
    docs = list(read_jsonl(p))
    assert [(d.id, d.text, d.title, d.source) for d in docs] == [("a", "alpha", "A", "s"), ("kb:3", "beta", "", "kb.jsonl")]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": \n', "line 2 is not valid JSON"),
        ('{"text": "ok"}\n["a list"]\n', "line 2 must be a JSON object"),
        ('{"text": "ok"}\n{"id": "x"}\n', "line 2 has no 'text'"),
        ('{"text": "ok", "title": {"a": 1}}\n', "field 'title' must be a string"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, content, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        list(read_jsonl(p))


def test_jsonl_non_utf8_names_line_and_byte_offset(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"line 2 is not valid UTF-8 \(byte offset 30"):
        list(read_jsonl(p))


def test_csv_reader_and_errors(tmp_path):
    p = tmp_path / "kb.csv"
    p.write_text('id,title,text\nx1,T,"hello, world"\n,,second\n', encoding="utf-8")
    docs = list(read_csv(p))
    assert [(d.id, d.text) for d in docs] == [("x1", "hello, world"), ("kb:2", "second")]
    p.write_text("id,body\n1,x\n", encoding="utf-8")
    with pytest.raises(InputError, match="no 'text' column"):
        list(read_csv(p))
    p.write_text("id,text\n1,\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 2 has an empty 'text'"):
        list(read_csv(p))
    p.write_bytes(b"id,text\n1,ok\n2,\xff\xfe\n")
    with pytest.raises(InputError, match="line 3 is not valid UTF-8"):
        list(read_csv(p))


def test_folder_reader_sorted_recursive(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.md").write_text("# Heading\nbody two", encoding="utf-8")
    (tmp_path / "one.txt").write_text("body one", encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    docs = list(read_folder(tmp_path))
    assert [(d.id, d.title) for d in docs] == [("b/two.md", "Heading"), ("one.txt", "one")]
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xc3\x28")
    with pytest.raises(InputError, match="bad.txt: line 2 is not valid UTF-8"):
        list(read_folder(tmp_path))


def test_text_source_dispatch_errors(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        read_text_source(tmp_path / "missing.jsonl")
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(InputError, match="unsupported source type .pdf"):
        read_text_source(tmp_path / "x.pdf")


def test_image_captions_relative_paths(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"not checked here")
    p = tmp_path / "caps.csv"
    p.write_text("image,caption\nimg/a.png,Chest X-ray: right lower lobe consolidation\n", encoding="utf-8")
    (doc,) = list(read_image_captions(p))
    assert doc.image_path == str((tmp_path / "img" / "a.png").resolve())
    assert doc.caption == doc.text == "Chest X-ray: right lower lobe consolidation"
    assert doc.id == "img/a.png"
    p.write_text("image,caption\nimg/missing.png,x\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 2: image img/missing.png not found"):
        list(read_image_captions(p))
    j = tmp_path / "caps.jsonl"
    j.write_text('{"image": "img/a.png"}\n', encoding="utf-8")
    with pytest.raises(InputError, match="line 1 has no 'caption'"):
        list(read_image_captions(j))


def test_chunk_words_sizes_and_overlap():
    words = [f"w{i}" for i in range(450)]
    chunks = chunk_words(" ".join(words), min_words=100, max_words=200, overlap=20)
    sizes = [len(c.split()) for c in chunks]
    assert all(100 <= s <= 200 for s in sizes), sizes
    # consecutive chunks overlap, and together they cover every word in order
    assert chunks[0].split()[-20:] == chunks[1].split()[:20]
    assert chunks[-1].split()[-1] == "w449"
    assert set(" ".join(chunks).split()) == set(words)
    assert chunk_words("short text", 100, 200) == ["short text"]
    assert chunk_words("   ", 100, 200) == []
    with pytest.raises(InputError, match="bad chunking parameters"):
        chunk_words("x", min_words=300, max_words=200)


def test_chunk_documents_ids_and_metadata():
    doc = Document(id="d", text=" ".join(["word"] * 250), title="T")
    parts = list(chunk_documents([doc], 100, 150, 10))
    assert [p.id for p in parts] == ["d#1", "d#2"]
    assert parts[1].metadata == {"chunk": 2, "parent_id": "d"}
    assert all(len(p.text.split()) >= 100 for p in parts)
