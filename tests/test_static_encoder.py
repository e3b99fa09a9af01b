"""The static text encoder distilled from the installed MiniLM (kb_pack/static_encoder.py).

Distillation runs the real MiniLM ONNX on `[CLS] token [SEP]`; to stay fast the tests distil the first
VOCAB_LIMIT token ids (all single characters and the most frequent WordPiece words; other rows stay zero),
which covers the everyday words of the respiratory chapter used below.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from medrwr_edge.errors import EncoderMismatchError, IntegrityError, MedrwrError, ModelError
from medrwr_edge.kb_pack.encoders import EncoderSpec, load_encoder, read_spec
from medrwr_edge.kb_pack.static_encoder import StaticTextEncoder, distil_static_encoder
from medrwr_edge.paths import sha256_file

VOCAB_LIMIT = 6000
CORPUS = ["Pneumonia, unspecified organism", "Acute bronchitis due to other specified organisms",
          "Chronic obstructive pulmonary disease with acute exacerbation", "Asthma, unspecified"] * 5


def _distil(source, out, **kw):
    kw.setdefault("vocab_limit", VOCAB_LIMIT)
    kw.setdefault("corpus_texts", CORPUS)
    return distil_static_encoder(source, out, name="static-test", **kw)


@pytest.fixture(scope="session")
def static_dir(tmp_path_factory, text_encoder):
    from medrwr_edge.assets import default_text_encoder_dir

    return _distil(default_text_encoder_dir(), tmp_path_factory.mktemp("static") / "enc")


@pytest.fixture(scope="session")
def static_encoder(static_dir):
    return load_encoder(static_dir)


@pytest.fixture(scope="session")
def static_pack(tmp_path_factory, static_encoder):
    from medrwr_edge.kb_pack import icd10
    from medrwr_edge.kb_pack.build import build_text_pack

    out = tmp_path_factory.mktemp("packs") / "icd-static"
    docs = icd10.icd10_documents(chapters=[10])
    return build_text_pack(docs, out, static_encoder, name="icd-static", version="test", progress=False)


def test_spec_and_files(static_dir, static_encoder):
    spec = read_spec(static_dir)
    assert spec.pooling == "static" and spec.kind == "text" and spec.dim == 384
    assert spec.onnx_file == "vectors.npy" and spec.onnx_sha256 == sha256_file(static_dir / "vectors.npy")
    assert isinstance(static_encoder, StaticTextEncoder) and static_encoder.sha256 == spec.onnx_sha256
    table = np.load(static_dir / "vectors.npy", allow_pickle=False)
    assert table.shape == (30522, 384) and table.dtype == np.float32
    assert not table[VOCAB_LIMIT:].any() and np.abs(table[1000:VOCAB_LIMIT]).sum(axis=1).min() > 0


def test_distillation_is_deterministic(tmp_path, text_encoder):
    from medrwr_edge.assets import default_text_encoder_dir

    a = _distil(default_text_encoder_dir(), tmp_path / "a", vocab_limit=1500)
    b = _distil(default_text_encoder_dir(), tmp_path / "b", vocab_limit=1500)
    assert sha256_file(a / "vectors.npy") == sha256_file(b / "vectors.npy")
    assert read_spec(a) == read_spec(b)
    c = _distil(default_text_encoder_dir(), tmp_path / "c", vocab_limit=1500, weighting="none")
    assert sha256_file(c / "vectors.npy") != sha256_file(a / "vectors.npy")  # the recipe reaches the file


def test_vectors_normalised_and_meaningful(static_encoder):
    texts = ["pneumonia of the lung", "infection of the lung", "fracture of the left arm", ""]
    v = static_encoder.embed(texts)
    assert v.shape == (4, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v[:3], axis=1), 1.0, atol=1e-5)
    assert not v[3].any()  # no tokens -> zero vector, never NaN
    assert v[0] @ v[1] > v[0] @ v[2]
    # Special tokens and padding never change a vector: [CLS]/[SEP] are excluded, batching adds no padding.
    assert np.allclose(static_encoder.embed(["pneumonia of the lung [SEP] [PAD]"])[0], v[0], atol=1e-6)
    assert np.allclose(static_encoder.embed(texts[:1])[0], v[0], atol=1e-6)
    with pytest.raises(MedrwrError):
        static_encoder.embed("a string, not a list")


def test_encoder_json_validation(static_dir, tmp_path):
    data = json.loads((static_dir / "encoder.json").read_text())
    EncoderSpec.from_dict(data)  # valid as written
    for field, bad in (("pooling", "sum"), ("onnx_sha256", "abc"), ("max_length", 1)):
        with pytest.raises(IntegrityError):
            EncoderSpec.from_dict({**data, field: bad})
    # Input names are optional only for a static encoder: the same spec as an ONNX encoder is refused.
    with pytest.raises(IntegrityError, match="input names"):
        EncoderSpec.from_dict({**data, "pooling": "mean"})
    # Old encoder.json files (the installed MiniLM) stay valid.
    from medrwr_edge.assets import default_text_encoder_dir

    assert read_spec(default_text_encoder_dir()).pooling == "mean"


def test_pack_build_hybrid_search_and_lock(static_pack, static_encoder, text_encoder, tmp_path):
    from medrwr_edge.kb_pack import icd10
    from medrwr_edge.kb_pack.build import build_text_pack
    from medrwr_edge.kb_pack.pack import Pack

    # A tiny MiniLM pack (12 entries keep the test fast) for the other direction of the lock.
    minilm_pack = build_text_pack(icd10.icd10_documents(chapters=[10], limit=12), tmp_path / "minilm", text_encoder,
                                  name="minilm-tiny", version="test", progress=False)

    with Pack.open(static_pack, encoder=static_encoder, verify="full") as pack:
        assert pack.verify() == []
        hits = pack.search("acute bronchitis due to streptococcus", k=3, mode="hybrid")
        assert hits and hits[0].doc_id.startswith("J20")
        assert pack.search("J45.909", k=1, mode="hybrid")[0].doc_id == "J45.909"
    with pytest.raises(EncoderMismatchError):
        Pack.open(static_pack, encoder=text_encoder)
    with pytest.raises(EncoderMismatchError):
        Pack.open(minilm_pack, encoder=static_encoder)
    with Pack.open(minilm_pack, encoder=text_encoder) as pack:  # each pack opens with its own encoder
        assert pack.search("pneumonia", k=1, mode="hybrid")


def test_cli_build_verify_search(static_dir, tmp_path, medrwr_home):
    from typer.testing import CliRunner

    from medrwr_edge.cli import app

    runner = CliRunner()
    out = tmp_path / "pack"
    r = runner.invoke(app, ["pack", "build", "icd10", "--chapters", "10", "--out", str(out), "--name", "st",
                            "--encoder", str(static_dir)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["pack", "verify", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["pack", "search", str(out), "pneumonia due to klebsiella", "--mode", "hybrid", "--json",
                            "--encoder", str(static_dir)])
    assert r.exit_code == 0, r.output
    assert "J15.0" in r.output


def test_tampered_vectors_detected(static_dir, tmp_path):
    enc = tmp_path / "enc"
    shutil.copytree(static_dir, enc)
    data = bytearray((enc / "vectors.npy").read_bytes())
    data[-1] ^= 1
    (enc / "vectors.npy").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="vectors.npy"):
        load_encoder(enc)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_bad_vectors_file_one_clear_error(static_dir, tmp_path, damage, capsys):
    from medrwr_edge.cli import main

    enc = tmp_path / "enc"
    shutil.copytree(static_dir, enc)
    vec = enc / "vectors.npy"
    if damage == "missing":
        vec.unlink()
    else:
        vec.write_bytes(vec.read_bytes()[:1000])
        # Re-record the hash so the load itself (not the hash check) meets the short file.
        spec = json.loads((enc / "encoder.json").read_text())
        spec["onnx_sha256"] = sha256_file(vec)
        (enc / "encoder.json").write_text(json.dumps(spec))
        with pytest.raises(ModelError, match="cannot read token vectors vectors.npy"):
            load_encoder(enc)
    with pytest.raises(SystemExit) as exc:
        main(["pack", "search", "nowhere", "x", "--encoder", str(enc)])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "vectors.npy" in err[0], err


def test_bad_distil_input(tmp_path, text_encoder, static_dir):
    from medrwr_edge.assets import default_text_encoder_dir

    with pytest.raises(MedrwrError, match="weighting"):
        _distil(default_text_encoder_dir(), tmp_path / "x", weighting="idf")
    with pytest.raises(MedrwrError, match="not a transformer text encoder"):
        _distil(static_dir, tmp_path / "y")
    with pytest.raises(MedrwrError, match="no encoder.json"):
        _distil(tmp_path, tmp_path / "z")
    (tmp_path / "exists").mkdir()
    with pytest.raises(MedrwrError, match="already exists"):
        _distil(default_text_encoder_dir(), tmp_path / "exists")
    assert not (tmp_path / "x").exists()


def test_runtime_path_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom medrwr_edge.kb_pack import static_encoder, encoders\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnxruntime'))\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
