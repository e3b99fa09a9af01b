"""Shared pieces for the evidence tests (report, log, replay, schema).

Records are made by the real `Session` and loop with the scripted backend, over real packs built with the
small deterministic encoders of pack_fakes.py (so these tests need no downloaded model). `fake_encoders` makes
those encoders the "installed" ones, exactly where a pack looks its locked encoder up.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medrwr_edge.errors import ModelError
from medrwr_edge.kb_pack.build import build_image_pack, build_text_pack
from medrwr_edge.kb_pack.documents import Document
from medrwr_edge.runtime.api import AskSettings, Session
from medrwr_edge.runtime.scripted_backend import ScriptedBackend
from pack_fakes import ColorHistogramEncoder, HashingTextEncoder

OPTIONS = ["A. Pneumothorax", "B. Asthma", "C. Bronchiectasis", "D. Influenza"]
QUESTION = "Which diagnosis fits the image?"

QUERY_THEN_ANSWER = [
    "<think> The film suggests air in the pleural space. </think>\n<query> \"pneumothorax\" </query>",
    " The entries describe a collapsed lung. </think>\n<answer> B </answer>",
    "<think> The reference case shows the same finding. </think>\n<answer> A </answer>",
]
PROBS = {"B": 0.42, "A": 0.93}  # the first answer is below the CDIR threshold (0.8), the second above

TEXT_DOCS = [
    ("J93.0", "J93.0 Spontaneous tension pneumothorax: air in the pleural space under pressure, collapsed lung"),
    ("J93.1", "J93.1 Other spontaneous pneumothorax: air in the pleural space without tension"),
    ("J45.909", "J45.909 Unspecified asthma, uncomplicated: reversible airway obstruction, wheeze"),
    ("J47.9", "J47.9 Bronchiectasis, uncomplicated: permanent dilation of the bronchi"),
    ("J11.1", "J11.1 Influenza with other respiratory manifestations, virus not identified"),
    ("J18.9", "J18.9 Pneumonia, unspecified organism: consolidation of the lung parenchyma"),
    ("J98.11", "J98.11 Atelectasis: collapse of lung tissue, loss of volume"),
    ("J90", "J90 Pleural effusion, not elsewhere classified: fluid in the pleural space"),
]


def validator(name: str = "evidence"):
    """A draft 2020-12 validator for a bundled schema; the replay schema refers to the evidence schema."""
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    from medrwr_edge.evidence.record import load_schema

    schemas = {n: load_schema(n) for n in ("evidence", "answer-log", "replay")}
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas.values())
    return Draft202012Validator(schemas[name], registry=registry, format_checker=Draft202012Validator.FORMAT_CHECKER)


def assert_valid(instance, name: str = "evidence") -> None:
    errors = sorted(validator(name).iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


def _png(path, rgb, size=(96, 96), pattern: int = 0):
    arr = np.zeros((*size, 3), dtype=np.uint8)
    arr[:] = rgb
    arr[pattern % size[0] :: 7, :] = (255, 255, 255)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="session")
def evidence_packs(tmp_path_factory):
    """(text pack dir, image pack dir, {encoder sha256: encoder}) built once per session."""
    root = tmp_path_factory.mktemp("evidence-packs")
    text_enc, image_enc = HashingTextEncoder(), ColorHistogramEncoder()
    docs = [Document(id=i, text=t, source="ICD-10-CM test subset") for i, t in TEXT_DOCS]
    text_pack = build_text_pack(docs, root / "icd-fake", text_enc, name="icd-fake", version="t1", progress=False)
    src = root / "ref-src"
    src.mkdir()
    colours = [((200, 40, 40), "Chest CT: right-sided pneumothorax with collapsed lung"),
               ((40, 200, 40), "Chest CT: bronchiectasis with dilated airways"),
               ((40, 40, 200), "Head CT: no acute intracranial finding"),
               ((120, 120, 120), "Chest radiograph: normal lungs")]
    image_docs = [Document(id=f"ref-{i}", text=cap, caption=cap, source="synthetic test images",
                           image_path=str(_png(src / f"r{i}.png", rgb, pattern=i)))
                  for i, (rgb, cap) in enumerate(colours)]
    image_pack = build_image_pack(image_docs, root / "ref-fake", image_enc, name="ref-fake", version="t1",
                                  progress=False)
    return text_pack, image_pack, {text_enc.sha256: text_enc, image_enc.sha256: image_enc}


@pytest.fixture
def fake_encoders(evidence_packs, monkeypatch):
    """Make the fake encoders the installed ones (looked up by the pack's encoder lock, as for real encoders)."""
    from medrwr_edge.kb_pack import pack as pack_module

    encoders = evidence_packs[2]

    def locked(manifest, pack_dir):
        enc = encoders.get(manifest["encoder"]["sha256"])
        if enc is None:
            raise ModelError(f"pack {pack_dir.name} needs an encoder that is not installed")
        return enc

    monkeypatch.setattr(pack_module, "_load_locked_encoder", locked)
    return encoders


@pytest.fixture
def input_png(tmp_path):
    """A reddish input image: its nearest reference (colour histogram) is ref-0."""
    return _png(tmp_path / "input.png", (205, 45, 35), size=(128, 160), pattern=3)


def run_scripted(text_pack, image_pack, image, outputs=QUERY_THEN_ANSWER, probs=PROBS, options=OPTIONS,
                 backend=None, **settings):
    """A record from the real Session + loop, with the scripted backend playing `outputs`."""
    be = backend or ScriptedBackend(outputs, probs=probs)
    packs = [text_pack] if text_pack is not None else []
    with Session(packs=packs, image_pack=image_pack, backend=be, settings=AskSettings(cdir=image_pack is not None)) as s:
        return s.ask(image, QUESTION, options, **settings)


def record_json(tmp_path, record, name="record.json"):
    path = tmp_path / name
    path.write_text(json.dumps(record.to_dict(), indent=2), "utf-8")
    return path
