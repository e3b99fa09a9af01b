"""Shared test fixtures. Every test runs with the network cut off: any socket connect or DNS lookup fails."""

from __future__ import annotations

import socket

import pytest


class NetworkAccessError(AssertionError):
    pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise NetworkAccessError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


@pytest.fixture
def medrwr_home(tmp_path, monkeypatch):
    """An empty, private data directory."""
    home = tmp_path / "home"
    monkeypatch.setenv("MEDRWR_EDGE_HOME", str(home))
    return home


# ---------------------------------------------------------------- real models and packs (installed by .ci/run)

def _installed(fn_name: str):
    """Path of an installed default artefact, or skip with the command that installs it."""
    from medrwr_edge import assets
    from medrwr_edge.errors import MedrwrError

    try:
        return getattr(assets, fn_name)()
    except MedrwrError as e:
        pytest.skip(f"{e} (run `medrwr-edge models install --smoke`)")


@pytest.fixture
def medrwr_home_with_encoders(tmp_path, monkeypatch):
    """An empty, private data directory that can still open the installed encoders (linked, read-only use): for
    real-model answers that search a pack (guided decoding always does)."""
    encoders = [_installed("default_text_encoder_dir"), _installed("default_image_encoder_dir")]
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    for d in encoders:
        (home / "models" / d.name).symlink_to(d, target_is_directory=True)
    monkeypatch.setenv("MEDRWR_EDGE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def smoke_gguf():
    return _installed("smoke_llm_path")


@pytest.fixture(scope="session")
def text_encoder():
    from medrwr_edge.kb_pack.encoders import load_encoder

    return load_encoder(_installed("default_text_encoder_dir"))


@pytest.fixture(scope="session")
def image_encoder():
    from medrwr_edge.kb_pack.encoders import load_encoder

    return load_encoder(_installed("default_image_encoder_dir"))


@pytest.fixture(scope="session")
def small_icd_pack(tmp_path_factory, text_encoder):
    """A real text pack: ICD-10-CM chapter 10 (respiratory, 482 entries), real MiniLM embeddings."""
    from medrwr_edge.kb_pack import icd10
    from medrwr_edge.kb_pack.build import build_text_pack

    out = tmp_path_factory.mktemp("packs") / "icd-small"
    docs = icd10.icd10_documents(chapters=[10])
    return build_text_pack(docs, out, text_encoder, name="icd-small", version="test", progress=False)


@pytest.fixture(scope="session")
def small_image_pack(tmp_path_factory, image_encoder):
    """A real image pack from the reference images that packages ship (pydicom, skimage, invesalius if present)."""
    from medrwr_edge.kb_pack.build import build_image_pack
    from medrwr_edge.kb_pack.reference_images import default_reference_documents

    work = tmp_path_factory.mktemp("refimg")
    docs = default_reference_documents(work)
    out = tmp_path_factory.mktemp("packs") / "ref-small"
    return build_image_pack(docs, out, image_encoder, name="ref-small", version="test", progress=False)


@pytest.fixture(scope="session")
def ct_png(tmp_path_factory):
    """A real CT slice (pydicom's CT_small test file), windowed and saved as PNG."""
    import pydicom.data
    from PIL import Image

    from medrwr_edge.imaging import load_image

    loaded = load_image(pydicom.data.get_testdata_file("CT_small.dcm"))
    out = tmp_path_factory.mktemp("img") / "ct.png"
    Image.fromarray(loaded.pixels).save(out)
    return out
