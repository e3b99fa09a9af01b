"""`medrwr-edge pack …` through typer's CliRunner: build, info, search, verify, diff, export, errors."""

from __future__ import annotations

import json
import tarfile

import pytest
from typer.testing import CliRunner

from medrwr_edge.cli import app
from medrwr_edge.errors import InputError, IntegrityError
from medrwr_edge.kb_pack import cli as pack_cli
from medrwr_edge.kb_pack import pack as pack_module
from pack_fakes import HashingTextEncoder

runner = CliRunner()


@pytest.fixture(autouse=True)
def fake_encoder(monkeypatch, medrwr_home):
    """The CLI loads the default ONNX encoder; these tests use the hashing stand-in instead (fast)."""
    enc = HashingTextEncoder()
    monkeypatch.setattr(pack_cli, "_text_encoder", lambda encoder_dir: enc)
    monkeypatch.setattr(pack_module, "_load_locked_encoder", lambda manifest, path: enc)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    return enc


def write_source(tmp_path, n=12):
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "kb.jsonl"
    topics = ["pneumothorax after central line", "lobar pneumonia consolidation", "pleural effusion meniscus"]
    src.write_text("".join(json.dumps({"id": f"K{i:02d}.{i % 3}", "text": f"{topics[i % 3]} case {i}",
                                       "title": topics[i % 3]}) + "\n" for i in range(n)), encoding="utf-8")
    return src


def invoke(*args):
    return runner.invoke(app, ["pack", *map(str, args)])


def build(tmp_path, name="kb", version="1", n=12):
    out = tmp_path / name
    r = invoke("build", "text", write_source(tmp_path, n), "--out", out, "--name", name, "--version", version,
               "--quiet", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["schema"] == "medrwr-edge/pack-build/1" and data["doc_count"] == n
    return out


def test_build_info_search_verify(tmp_path):
    out = build(tmp_path)
    r = invoke("info", out, "--json")
    info = json.loads(r.output)
    assert info["schema"] == "medrwr-edge/pack-info/1" and info["name"] == "kb" and info["search"]["mode"] == "hybrid"
    r = invoke("info", out)
    assert r.exit_code == 0 and "12" in r.output and "hybrid" in r.output

    r = invoke("search", out, "what is K04.1?", "-k", "2", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["schema"] == "medrwr-edge/pack-search/1" and res["k"] == 2 and len(res["hits"]) == 2
    assert res["hits"][0]["doc_id"] == "K04.1" and res["hits"][0]["ranks"]["exact"] == 1
    r = invoke("search", out, "pleural effusion", "--mode", "lexical")
    assert r.exit_code == 0 and "pleural effusion" in r.output

    r = invoke("verify", out)
    assert r.exit_code == 0 and "ok" in r.output


def test_verify_lists_problems_and_exits_1(tmp_path):
    out = build(tmp_path)
    data = bytearray((out / "docs.sqlite").read_bytes())
    data[100] ^= 0xFF
    (out / "docs.sqlite").write_bytes(bytes(data))
    (out / "index.hnsw").unlink()
    r = invoke("verify", out, "--json")
    assert r.exit_code == 1
    res = json.loads(r.output)
    assert res["ok"] is False and res["schema"] == "medrwr-edge/pack-verify/1"
    assert sorted(res["problems"]) == ["docs.sqlite has been modified (sha256 differs from the manifest)",
                                       "index.hnsw is missing"]
    r = invoke("verify", out)
    assert r.exit_code == 1 and "2 problem(s)" in r.output


def test_diff_cli(tmp_path):
    old = build(tmp_path / "a", n=10)
    new = build(tmp_path / "b", version="2", n=12)
    r = invoke("diff", old, new, "--json")
    res = json.loads(r.output)
    assert res["added"] == ["K10.1", "K11.2"] and res["removed"] == [] and res["unchanged"] == 10
    r = invoke("diff", old, new)
    assert "added: 2" in r.output and "K11.2" in r.output


def test_chunking_option(tmp_path):
    src = tmp_path / "long.jsonl"
    src.write_text(json.dumps({"id": "long", "text": " ".join(f"w{i}" for i in range(500))}) + "\n", encoding="utf-8")
    r = invoke("build", "text", src, "--out", tmp_path / "p", "--name", "p", "--version", "1", "--chunk-words",
               "200", "--quiet")
    assert r.exit_code == 0, r.output
    info = json.loads(invoke("info", tmp_path / "p", "--json").output)
    assert info["doc_count"] == 3 and info["build"]["params"]["chunk_words"] == 200


def test_export_tar(tmp_path):
    out = build(tmp_path)
    tar_path = tmp_path / "kb.tar"
    r = invoke("export", out, "--out", tar_path)
    assert r.exit_code == 0, r.output
    with tarfile.open(tar_path) as tar:
        assert tar.getnames() == ["kb/manifest.json", "kb/docs.sqlite", "kb/index.hnsw"]
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert invoke("verify", tmp_path / "unpacked" / "kb").exit_code == 0


@pytest.mark.parametrize("args, error, message", [
    (["build", "text", "missing.jsonl", "--name", "x", "--version", "1"], InputError, "no such file or folder"),
    (["search", "nope-pack", "q"], InputError, "pack not found"),
    (["info", "."], IntegrityError, "not a knowledge pack"),
])
def test_errors_are_medrwr_errors(tmp_path, monkeypatch, args, error, message):
    monkeypatch.chdir(tmp_path)
    r = invoke(*args)
    assert r.exit_code != 0
    assert isinstance(r.exception, error) and message in str(r.exception)


def test_bad_jsonl_via_cli(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "ok"}\n{"text": "broken"\n', encoding="utf-8")
    r = invoke("build", "text", src, "--out", tmp_path / "p", "--name", "p", "--version", "1", "--quiet")
    assert isinstance(r.exception, InputError) and "line 2 is not valid JSON" in str(r.exception)
    assert not (tmp_path / "p").exists()


def test_search_k_errors(tmp_path):
    out = build(tmp_path)
    for k, msg in (("0", "k must be at least 1"), ("13", "k=13 is more than the 12 documents")):
        r = invoke("search", out, "pneumonia", "-k", k)
        assert isinstance(r.exception, InputError) and msg in str(r.exception)
    r = invoke("search", out)
    assert isinstance(r.exception, InputError) and "either a text query or --image" in str(r.exception)


def test_main_prints_one_line_and_exits_nonzero(tmp_path, capsys):
    from medrwr_edge.cli import main

    with pytest.raises(SystemExit) as e:
        main(["pack", "info", str(tmp_path / "missing")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: pack not found")


def test_image_pack_cli(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from pack_fakes import ColorHistogramEncoder

    enc = ColorHistogramEncoder()
    monkeypatch.setattr(pack_cli, "_image_encoder", lambda encoder_dir: enc)
    monkeypatch.setattr(pack_module, "_load_locked_encoder", lambda manifest, path: enc)
    (tmp_path / "img").mkdir()
    rows = ["image,caption,id"]
    for name, color in {"red": (220, 10, 10), "blue": (10, 10, 220)}.items():
        Image.fromarray(np.full((64, 96, 3), color, dtype=np.uint8)).save(tmp_path / "img" / f"{name}.png")
        rows.append(f"img/{name}.png,A {name} square,{name}")
    (tmp_path / "caps.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    r = invoke("build", "images", tmp_path / "caps.csv", "--out", tmp_path / "refs", "--quiet")
    assert r.exit_code == 0, r.output
    r = invoke("search", tmp_path / "refs", "--image", tmp_path / "img" / "blue.png", "-k", "1", "--json")
    assert r.exit_code == 0, r.output
    hit = json.loads(r.output)["hits"][0]
    assert hit["doc_id"] == "blue" and hit["caption"] == "A blue square" and hit["image_path"].endswith(".png")
    assert invoke("verify", tmp_path / "refs").exit_code == 0


def test_icd10_build_cli(tmp_path):
    pytest.importorskip("simple_icd_10_cm")
    r = invoke("build", "icd10", "--out", tmp_path / "icd", "--limit", "30", "--chapters", "10,9", "--quiet", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(invoke("info", tmp_path / "icd", "--json").output)
    assert info["doc_count"] == 30 and info["build"]["params"]["chapters"] == [9, 10]
    r = invoke("search", tmp_path / "icd", "what is in chapter 9", "-k", "1", "--mode", "lexical", "--json")
    assert json.loads(r.output)["hits"][0]["doc_id"] == "Chapter 9"
    r = invoke("build", "icd10", "--out", tmp_path / "bad", "--chapters", "23")
    assert isinstance(r.exception, InputError) and "chapter" in str(r.exception)
