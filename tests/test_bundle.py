"""Deployment bundles: the pure-Python Ed25519 verifier, keys, create/verify/install, tampering, and (slow) the
whole offline install in a fresh virtualenv inside a network namespace."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medrwr_edge import assets
from medrwr_edge.deploy import bundle as deploy
from medrwr_edge.deploy import verify_and_install as standalone
from medrwr_edge.deploy.signing import keygen
from medrwr_edge.errors import InputError, IntegrityError

cryptography = pytest.importorskip("cryptography", reason="signing tests need the `cryptography` package")
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ------------------------------------------------------------------------------------------------ Ed25519


def test_rfc8032_test_vector_1():
    # RFC 8032, 7.1, TEST 1 (empty message)
    public = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    signature = bytes.fromhex("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bac"
                              "c61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")
    assert standalone.ed25519_verify(public, b"", signature)
    assert not standalone.ed25519_verify(public, b"\x00", signature)


@pytest.mark.parametrize("size", [0, 1, 64, 1000])
def test_pure_python_verify_agrees_with_cryptography(size):
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    message = os.urandom(size)
    sig = key.sign(message)
    assert standalone.ed25519_verify(_raw_public(key), message, sig)  # valid
    assert not standalone.ed25519_verify(_raw_public(key), message + b"!", sig)  # tampered message
    for i in (0, 31, 32, 63):  # tampered signature: R half and S half
        bad = bytearray(sig)
        bad[i] ^= 0x04
        assert not standalone.ed25519_verify(_raw_public(key), message, bytes(bad))
    assert not standalone.ed25519_verify(_raw_public(other), message, sig)  # wrong key
    assert not standalone.ed25519_verify(_raw_public(key), message, sig[:63])


def test_non_canonical_s_is_rejected():
    key = Ed25519PrivateKey.generate()
    sig = key.sign(b"m")
    s = int.from_bytes(sig[32:], "little") + standalone._L  # same point equation, malleated encoding
    assert s < 2**256
    assert not standalone.ed25519_verify(_raw_public(key), b"m", sig[:32] + s.to_bytes(32, "little"))


def test_public_key_pem_is_read_without_cryptography(tmp_path):
    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert standalone.load_public_key(pem) == _raw_public(key)
    with pytest.raises(standalone.BundleRejected, match="PEM"):
        standalone.load_public_key(b"not a key")
    rsa_like = b"-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(b"\x30" * 44) + b"\n-----END PUBLIC KEY-----\n"
    with pytest.raises(standalone.BundleRejected, match="Ed25519"):
        standalone.load_public_key(rsa_like)


def test_keygen_modes_and_refusal(tmp_path):
    private, public = keygen(tmp_path / "keys")
    assert private.stat().st_mode & 0o777 == 0o600
    assert public.stat().st_mode & 0o077 == 0o044
    key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    assert standalone.load_public_key(public.read_bytes()) == _raw_public(key)
    with pytest.raises(InputError, match="already exists"):
        keygen(tmp_path / "keys")
    before = private.read_bytes()
    keygen(tmp_path / "keys", force=True)
    assert private.read_bytes() != before


def test_signing_key_readable_by_others_is_refused(tmp_path):
    from medrwr_edge.deploy.signing import Signer

    private, _ = keygen(tmp_path)
    os.chmod(private, 0o644)
    with pytest.raises(InputError, match="chmod 600"):
        Signer(private)


# ------------------------------------------------------------------------------------------------ bundles


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory, text_encoder):
    """A real 40-document ICD-10-CM pack embedded with the installed MiniLM (fast to build)."""
    from itertools import islice

    from medrwr_edge.kb_pack import icd10
    from medrwr_edge.kb_pack.build import build_text_pack

    out = tmp_path_factory.mktemp("bundle-packs") / "icd-tiny"
    docs = list(islice(icd10.icd10_documents(chapters=[10]), 40))
    return build_text_pack(docs, out, text_encoder, name="icd-tiny", version="test", progress=False)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    private, public = keygen(tmp_path_factory.mktemp("keys"))
    return private, public


@pytest.fixture(scope="module")
def data_bundle(tmp_path_factory, keys, tiny_pack):
    """A data-only bundle (no wheels): the MiniLM encoder and the tiny pack, signed."""
    out = tmp_path_factory.mktemp("bundles") / "data-bundle"
    return deploy.create(out, keys[0], models=[], encoders=[assets.MINILM], packs=[str(tiny_pack)],
                         wheels=False, log=lambda line: None)


def test_manifest_lists_every_file_and_verifies(data_bundle, keys):
    manifest = json.loads((data_bundle / "manifest.json").read_text())
    on_disk = {p.relative_to(data_bundle).as_posix() for p in data_bundle.rglob("*") if p.is_file()}
    assert on_disk - set(manifest["files"]) == {"manifest.json", "manifest.sig"}
    assert manifest["format"] == standalone.BUNDLE_FORMAT
    assert manifest["install"] is None
    assert [m["name"] for m in manifest["models"]] == [assets.MINILM]
    assert [p["name"] for p in manifest["packs"]] == ["icd-tiny"]
    assert (data_bundle / "manifest.json").read_bytes() == deploy.canonical_manifest_bytes(manifest)
    assert deploy.verify(data_bundle, keys[1].read_bytes())["files"] == manifest["files"]
    assert not data_bundle.with_name("data-bundle.partial").exists()


def test_create_refuses_existing_out_and_missing_encoder(tmp_path, data_bundle, keys, tiny_pack):
    with pytest.raises(InputError, match="already exists"):
        deploy.create(data_bundle, keys[0], models=[], encoders=[assets.MINILM], packs=[], wheels=False)
    with pytest.raises(InputError, match="not in the bundle"):
        deploy.create(tmp_path / "b", keys[0], models=[], encoders=[], packs=[str(tiny_pack)], wheels=False)
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()


def test_create_refuses_a_damaged_pack(tmp_path, keys, tiny_pack):
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_pack, damaged)
    with open(damaged / "docs.sqlite", "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xfe")
    with pytest.raises(IntegrityError):
        deploy.create(tmp_path / "b", keys[0], models=[], encoders=[assets.MINILM], packs=[str(damaged)],
                      wheels=False)
    assert not (tmp_path / "b").exists()


def test_foreign_platform_is_refused_before_any_work(tmp_path, keys):
    with pytest.raises(InputError, match="source only"):
        deploy.build_wheels(tmp_path / "w", platform="macosx_11_0_arm64", log=lambda line: None)
    assert not (tmp_path / "w").exists()
    assert deploy.platform_runs_here_built_wheels(deploy.local_platform())


def test_installed_constraints_pin_what_runs_here():
    from importlib import metadata

    pins = deploy.installed_constraints()
    assert f"numpy=={metadata.version('numpy')}" in pins
    assert not any(p.lower().startswith(("medrwr-edge==", "medrwr_edge==")) or "+" in p for p in pins)


def _tamper_modify(b):
    with open(b / "packs/icd-tiny/docs.sqlite", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))


def _tamper_add(b):
    (b / "wheels").mkdir(exist_ok=True)
    (b / "wheels" / "evil-1.0-py3-none-any.whl").write_bytes(b"PK")


def _tamper_remove(b):
    (b / "packs/icd-tiny/index.hnsw").unlink()


def _tamper_manifest(b):
    m = json.loads((b / "manifest.json").read_text())
    m["packs"][0]["version"] = "evil"
    (b / "manifest.json").write_bytes(deploy.canonical_manifest_bytes(m))


def _tamper_signature(b):
    sig = bytearray(base64.b64decode((b / "manifest.sig").read_bytes()))
    sig[5] ^= 1
    (b / "manifest.sig").write_bytes(base64.b64encode(bytes(sig)) + b"\n")


def _tamper_symlink(b):
    target = b / "packs/icd-tiny/manifest.json"
    target.rename(b / "moved.json")
    target.symlink_to(b / "moved.json")


TAMPERS = {"modified-file": (_tamper_modify, "does not match its sha256"),
           "added-file": (_tamper_add, "not listed in the signed manifest"),
           "removed-file": (_tamper_remove, "missing"),
           "modified-manifest": (_tamper_manifest, "signature"),
           "bad-signature": (_tamper_signature, "signature"),
           "symlink": (_tamper_symlink, "symbolic link")}


def _cli(argv, capsys):
    from medrwr_edge.cli import main

    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", sorted(TAMPERS))
def test_tampered_bundle_is_refused_and_nothing_installed(case, tmp_path, data_bundle, keys, medrwr_home, capsys):
    tamper, expected = TAMPERS[case]
    copy = tmp_path / "bundle"
    shutil.copytree(data_bundle, copy, symlinks=True)
    tamper(copy)
    code, out, err = _cli(["bundle", "install", "--from", copy, "--trusted-key", keys[1]], capsys)
    assert code != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: deployment bundle refused") and expected in lines[0], err
    assert "Traceback" not in err
    assert not medrwr_home.exists() or not any(p.is_file() for p in medrwr_home.rglob("*"))
    # the stdlib script refuses the same way
    assert standalone.main([str(copy), "--trusted-key", str(keys[1]), "--verify-only"]) == 1
    assert expected in capsys.readouterr().err


def test_wrong_trusted_key_is_refused(tmp_path, data_bundle, medrwr_home, capsys):
    _, other_public = keygen(tmp_path / "other")
    code, _, err = _cli(["bundle", "verify", data_bundle, "--trusted-key", other_public], capsys)
    assert code != 0 and "does not verify with the trusted key" in err and len(err.strip().splitlines()) == 1


def test_standalone_script_runs_with_the_standard_library_only(data_bundle, keys):
    # -I -S: no site-packages at all, so any third-party import would fail
    proc = subprocess.run([sys.executable, "-I", "-S", str(data_bundle / "verify_and_install.py"), "--trusted-key",
                           str(keys[1]), "--verify-only"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "verified:" in proc.stdout


def test_install_data_then_unchanged_then_conflict(data_bundle, keys, medrwr_home, capsys):
    from medrwr_edge.kb_pack.pack import Pack
    from medrwr_edge.paths import models_dir, packs_dir

    code, out, err = _cli(["bundle", "install", "--from", data_bundle, "--trusted-key", keys[1]], capsys)
    assert code == 0, err
    assert out.count("installed:") == 2
    assert assets.verify([assets.MINILM]) == []
    with Pack.open(packs_dir() / "icd-tiny") as pack:
        assert pack.verify() == []
        assert pack.search("pneumonia", k=3)  # its locked encoder is found in the new data directory
    code, out, _ = _cli(["bundle", "install", "--from", data_bundle, "--trusted-key", keys[1]], capsys)
    assert out.count("unchanged:") == 2
    tokenizer = models_dir() / assets.MINILM / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes() + b" ")
    code, _, err = _cli(["bundle", "install", "--from", data_bundle, "--trusted-key", keys[1]], capsys)
    assert code != 0 and "--force" in err
    code, out, err = _cli(["bundle", "install", "--from", data_bundle, "--trusted-key", keys[1], "--force"], capsys)
    assert code == 0 and "replaced:" in out, err
    assert assets.verify([assets.MINILM]) == []


def test_gguf_path_of_a_registry_model_is_bundled_as_that_model(smoke_gguf):
    item = deploy.plan_model(str(smoke_gguf))
    assert item.name == assets.SMOLLM2 and item.kind == "llm"
    assert assets.INSTALLED_JSON in item.files and item.info["registry"]


# ------------------------------------------------------------------------------------------------ end to end


def _netns() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.real_model
def test_offline_install_in_a_fresh_venv_with_the_network_blocked(tmp_path, keys, tiny_pack, smoke_gguf):
    if not _netns():
        pytest.skip("`unshare -rn` is unavailable here: cannot block the network for the install")
    out = tmp_path / "bundle"
    try:  # the connected-machine step: pip fetches/builds the wheels (pip's caches make repeats quick)
        deploy.create(out, keys[0], models=[str(smoke_gguf)], encoders=[assets.MINILM], packs=[str(tiny_pack)],
                      log=lambda line: None)
    except Exception as e:  # no package index reachable from this machine
        if "pip could not" in str(e):
            pytest.skip(f"cannot collect wheels here: {e}")
        raise
    manifest = json.loads((out / "manifest.json").read_text())
    wheels = manifest["install"]["wheels"]
    assert any(w.startswith("llama_cpp_python-0.3.36-") for w in wheels)
    assert any(w.startswith("hnswlib-") for w in wheels) and any(w.startswith("medrwr_edge-") for w in wheels)
    assert not any(w.startswith(("torch-", "transformers-")) for w in wheels)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    python = venv / "bin" / "python"
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDRWR_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(MEDRWR_EDGE_HOME=str(home), MEDRWR_EDGE_NO_LOG="1")
    proc = subprocess.run(["unshare", "-rn", str(python), str(out / "verify_and_install.py"), "--trusted-key",
                           str(keys[1])], capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "verified:" in proc.stdout and "installed:" in proc.stdout
    where = subprocess.run([str(python), "-c", "import medrwr_edge; print(medrwr_edge.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert str(venv) in where.stdout  # the venv's own copy, not this checkout
    model = home / "models" / assets.SMOLLM2
    ask = subprocess.run(["unshare", "-rn", str(venv / "bin" / "medrwr-edge"), "ask", "-",
                          "Which ICD-10-CM code is acute bronchitis?", "-o", "A. J20.9", "-o", "B. J18.9",
                          "--model", str(model), "--pack", "icd-tiny", "--max-tokens", "24", "--threads", "1",
                          "--ctx", "2048", "--json", "--no-log"], capture_output=True, text=True, env=env, timeout=600,
                         cwd=tmp_path)
    assert ask.returncode == 0, ask.stderr[-3000:]
    record = json.loads(ask.stdout)
    assert record["model"]["sha256"] == assets.get_artefact(assets.SMOLLM2).sha256
    assert [p["name"] for p in record["packs"]] == ["icd-tiny"]


@pytest.mark.slow
def test_tampered_bundle_installs_nothing_into_a_fresh_venv(tmp_path, data_bundle, keys):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    copy = tmp_path / "bundle"
    shutil.copytree(data_bundle, copy)
    _tamper_add(copy)
    home = tmp_path / "home"
    env = dict(os.environ, MEDRWR_EDGE_HOME=str(home))
    proc = subprocess.run([str(venv / "bin" / "python"), str(copy / "verify_and_install.py"), "--trusted-key",
                           str(keys[1])], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and proc.stderr.startswith("error: deployment bundle refused")
    assert not home.exists()
    assert not list((venv / "lib").rglob("medrwr_edge*"))


def test_tar_bundle_is_reproducible_and_installs(tmp_path, keys, tiny_pack, medrwr_home, monkeypatch, capsys):
    import tarfile

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    monkeypatch.delenv("MEDRWR_EDGE_HOME")  # create reads the installed encoder
    made = [deploy.create(tmp_path / f"{n}/b.tar", keys[0], models=[], encoders=[assets.MINILM],
                          packs=[str(tiny_pack)], wheels=False, log=lambda line: None) for n in ("one", "two")]
    assert made[0].is_file() and made[0].read_bytes() == made[1].read_bytes()
    assert not list(tmp_path.rglob("*.partial*"))
    monkeypatch.setenv("MEDRWR_EDGE_HOME", str(medrwr_home))
    code, out, err = _cli(["bundle", "install", "--from", made[0], "--trusted-key", keys[1]], capsys)
    assert code == 0 and out.count("installed:") == 2, err
    # an archive smuggling a path outside the bundle is refused before anything is verified or written
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 1
        tar.addfile(info, __import__("io").BytesIO(b"x"))
    code, _, err = _cli(["bundle", "verify", evil, "--trusted-key", keys[1]], capsys)
    assert code != 0 and "unsafe path" in err
    assert not (tmp_path / "outside.txt").exists()


# ------------------------------------------------------------------------------------------------ pip gets the hashes


def _fake_wheel(folder: Path, name: str, version: str, requires=(), body: str = "") -> Path:
    """A minimal but valid wheel, for the real pip (offline: --no-index)."""
    import zipfile

    module = name.replace("-", "_")
    path = folder / f"{module}-{version}-py3-none-any.whl"
    meta = f"{module}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{module}/__init__.py", body)
        zf.writestr(f"{meta}/METADATA", metadata)
        zf.writestr(f"{meta}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{meta}/RECORD", "")
    return path


def _wheel_bundle(root: Path) -> dict:
    """A bundle folder with two wheels (app -> dep) and the manifest entries a signed manifest would hold."""
    wheels = root / "wheels"
    wheels.mkdir(parents=True)
    made = [_fake_wheel(wheels, "medrwr-fake-app", "1.0", requires=["medrwr-fake-dep==2.0"]),
            _fake_wheel(wheels, "medrwr-fake-dep", "2.0", body="VERSION = 'signed'\n")]
    files = {f"wheels/{p.name}": {"size": p.stat().st_size, "sha256": standalone.sha256_file(p)} for p in made}
    return {"files": files, "install": {"requirement": "medrwr-fake-app==1.0"}}


def test_the_installer_pins_every_wheel_to_its_signed_hash():
    manifest = {"install": {"requirement": "medrwr-edge==0.1.0"}, "files": {
        "wheels/medrwr_edge-0.1.0-py3-none-any.whl": {"size": 1, "sha256": "a" * 64},
        "wheels/numpy-2.1.0-cp311-cp311-manylinux_2_17_x86_64.whl": {"size": 1, "sha256": "b" * 64},
        "wheels/Llama_Cpp_Python-0.3.36-cp311-cp311-linux_x86_64.whl": {"size": 1, "sha256": "c" * 64},
        "models/x/model.gguf": {"size": 1, "sha256": "d" * 64}}}
    assert standalone.hashed_requirements(manifest).splitlines() == [
        f"llama-cpp-python==0.3.36 --hash=sha256:{'c' * 64}", f"medrwr-edge==0.1.0 --hash=sha256:{'a' * 64}",
        f"numpy==2.1.0 --hash=sha256:{'b' * 64}"]
    cmd = standalone.pip_install_command("python", Path("/b"), Path("/t/req.txt"))
    assert {"--require-hashes", "--no-index", "--only-binary"} <= set(cmd) and cmd[-2:] == ["-r", "/t/req.txt"]
    assert cmd[cmd.index("--find-links") + 1] == "/b/wheels"
    manifest["files"]["wheels/numpy-2.2.0-cp311-cp311-manylinux_2_17_x86_64.whl"] = {"size": 1, "sha256": "e" * 64}
    with pytest.raises(standalone.BundleRejected, match="two versions of numpy"):
        standalone.hashed_requirements(manifest)


def test_main_feeds_pip_the_signed_hashes(tmp_path, monkeypatch, capsys):
    manifest = _wheel_bundle(tmp_path / "b")
    manifest.update(signing_key={"fingerprint": "f"}, target={})
    monkeypatch.setattr(standalone, "verify_bundle", lambda bundle, key: manifest)
    monkeypatch.setattr(standalone, "check_python", lambda manifest, python: None)
    seen = []

    def run(cmd, **kw):
        if "pip" in cmd:
            seen.append((cmd, Path(cmd[-1]).read_text()))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(standalone.subprocess, "run", run)
    (tmp_path / "key.pub").write_bytes(b"")
    assert standalone.main([str(tmp_path / "b"), "--trusted-key", str(tmp_path / "key.pub")]) == 0
    (cmd, requirements), = seen
    assert "--require-hashes" in cmd
    for rel, entry in manifest["files"].items():
        assert f"--hash=sha256:{entry['sha256']}" in requirements
    assert not Path(cmd[-1]).exists()  # the requirements file lived in a temp folder, not in the bundle


def test_pip_refuses_a_wheel_changed_after_the_check(tmp_path):
    """The time-of-check/time-of-use gap: a wheel replaced after verify_bundle is refused by pip itself."""
    bundle = tmp_path / "b"
    manifest = _wheel_bundle(bundle)
    requirements = tmp_path / "req.txt"
    requirements.write_text(standalone.hashed_requirements(manifest))

    def pip(target):
        cmd = standalone.pip_install_command(sys.executable, bundle, requirements) + ["--target", str(target)]
        return subprocess.run(cmd, env=standalone.offline_pip_env(), capture_output=True, text=True, timeout=300)

    ok = pip(tmp_path / "site1")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "site1" / "medrwr_fake_dep" / "__init__.py").read_text() == "VERSION = 'signed'\n"
    dep = next((bundle / "wheels").glob("medrwr_fake_dep-*.whl"))
    dep.unlink()
    _fake_wheel(bundle / "wheels", "medrwr-fake-dep", "2.0", body="VERSION = 'swapped'\n")  # same name, new bytes
    refused = pip(tmp_path / "site2")
    assert refused.returncode != 0 and "DO NOT MATCH THE HASHES" in refused.stderr
    assert not (tmp_path / "site2" / "medrwr_fake_dep").exists()
