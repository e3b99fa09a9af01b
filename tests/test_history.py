"""Patient history packs (medrwr_edge/history): add/update/no-op, list/show, isolation between patients, deletion
(history, logged answers), permissions, encryption at rest, bad input, DICOM SR without identifiers, and a real
small-model `ask --history` through the CLI."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from cli_harness import installed_models_dir, private_home

KEY_A = "study-7f3a-patient-A"
KEY_B = "study-7f3a-patient-B"

# Distinctive words: if they reach a file, a record or the output, the grep below finds them.
NOTES_A = """Chronic obstructive pulmonary disease diagnosed in 2019, GOLD stage 2. Uses a tiotropium inhaler daily
and salbutamol as needed; zephyrine cough syrup helped the winter exacerbation.

Medications:

Tiotropium 18 mcg once daily. Salbutamol 100 mcg two puffs as needed for wheeze. Lisinopril 10 mg for hypertension.

Prior chest CT showed centrilobular emphysema in both upper lobes and a 6 mm nodule in the right lower lobe, to be
followed up in twelve months.
"""
NOTES_A2 = """Follow-up chest CT one year later: the right lower lobe nodule is stable at 6 mm, so no further imaging
follow-up of the nodule is needed. Emphysema unchanged.
"""
NOTES_B = """Type 1 diabetes mellitus since childhood, on an insulin pump. Diabetic retinopathy treated with laser in
both eyes.

Fractured left wrist (distal radius) after a fall while skiing; treated with a cast for six weeks and healed well.
"""
KNOWLEDGE = [
    ("icd10:J44.9", "J44.9 Chronic obstructive pulmonary disease, unspecified"),
    ("icd10:I10", "I10 Essential (primary) hypertension"),
    ("icd10:J18.9", "J18.9 Pneumonia, unspecified organism"),
    ("icd10:S52.50", "S52.50 Unspecified fracture of the lower end of the radius"),
    ("icd10:E10.9", "E10.9 Type 1 diabetes mellitus without complications"),
    ("icd10:R91.1", "R91.1 Solitary pulmonary nodule"),
]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def knowledge_packs(tmp_path_factory, text_encoder):
    """Three tiny real text packs (same six ICD-10-CM entries, different names), real MiniLM embeddings."""
    from medrwr_edge.kb_pack.build import build_text_pack
    from medrwr_edge.kb_pack.documents import Document

    docs = [Document(id=i, text=t, source="test", title=t.split(" ", 1)[1], metadata={"code": i.split(":")[1]})
            for i, t in KNOWLEDGE]
    root = tmp_path_factory.mktemp("kpacks")
    return [build_text_pack(docs, root / name, text_encoder, name=name, version="test", progress=False)
            for name in ("icd-a", "icd-b", "icd-c")]


@pytest.fixture
def home(tmp_path, monkeypatch, text_encoder):
    """A private data dir whose models/ links to the installed models (the CLI loads the real MiniLM)."""
    h = private_home(tmp_path, installed_models_dir())
    monkeypatch.setenv("MEDRWR_EDGE_HOME", str(h))
    monkeypatch.delenv("MEDRWR_EDGE_HISTORY_SECRET", raising=False)
    monkeypatch.delenv("MEDRWR_EDGE_NO_LOG", raising=False)
    return h


@pytest.fixture
def notes(tmp_path):
    d = tmp_path / "notes"
    d.mkdir()
    out = {}
    for name, text in (("a.txt", NOTES_A), ("a2.md", NOTES_A2), ("b.txt", NOTES_B)):
        (d / name).write_text(text, encoding="utf-8")
        out[name] = d / name
    return out


def cli(*args):
    """Run the CLI in-process the way `medrwr-edge` does (main: one error line, exit code)."""
    from medrwr_edge.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def files_under(root: Path):
    return [p for p in root.rglob("*")
            if p.is_file() and not p.is_symlink() and "models" not in p.relative_to(root).parts]


def assert_nowhere(root: Path, *needles: bytes):
    for p in files_under(root):
        data = p.read_bytes()
        for n in needles:
            assert n not in data, f"{n!r} found in {p}"


def scripted_session_ask(packs, history, query, log=False):
    from medrwr_edge.runtime.api import ask
    from medrwr_edge.runtime.scripted_backend import ScriptedBackend

    be = ScriptedBackend([f"<think> check the record </think>\n<query> {query} </query>", "<answer> A </answer>"])
    rec = ask(None, "Which code applies?", ["A. J44.9", "B. I10"], packs=packs, image_pack=False, backend=be,
              cdir=False, history=history)
    if log:
        from medrwr_edge.evidence.log import log_if_enabled

        log_if_enabled(rec, "ask")
    return rec


# ------------------------------------------------------------------------------------------ add / list / show


def test_add_update_noop_list_show(home, notes, capsys):
    assert cli("history", "add", KEY_A, notes["a.txt"], "--date", "2024-03-01", "--label", "GP letter") == 0
    out = capsys.readouterr().out
    assert "file 1: added 3 passage(s)" in out and "created: 3 passage(s), revision 1" in out

    assert cli("history", "add", KEY_A, notes["a.txt"]) == 0  # same file again: a reported no-op
    out = capsys.readouterr().out
    assert "file 1: already in this history" in out and "unchanged: 3 passage(s), revision 1" in out

    assert cli("history", "add", KEY_A, notes["a.txt"], notes["a2.md"], "--date", "2025-03-04") == 0  # incremental
    out = capsys.readouterr().out
    assert "file 1: already in this history" in out and "file 2: added 1 passage(s)" in out
    assert "updated: 4 passage(s), revision 2" in out

    assert cli("history", "add", KEY_B, notes["b.txt"]) == 0
    capsys.readouterr()
    assert cli("history", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(h["passages"] for h in listed) == [2, 4]
    a = next(h for h in listed if h["passages"] == 4)
    assert a["dates"] == ["2024-03-01", "2025-03-04"] and a["revision"] == 2

    assert cli("history", "show", KEY_A) == 0
    shown = capsys.readouterr().out
    assert a["history_id"] in shown and "GP letter" in shown and "2024-03-01" in shown
    assert "zephyrine" not in shown  # show lists files, never the text

    # The key is never stored (not in a file name, not in a file) and the notes are not on disk in plain text.
    root = home / "history"
    assert all(KEY_A not in str(p) and KEY_B not in str(p) for p in root.rglob("*"))
    assert_nowhere(home, KEY_A.encode(), KEY_B.encode(), b"zephyrine", b"tiotropium", b"Tiotropium", b"retinopathy",
                   b"a.txt", b"GP letter")


def test_permissions_are_private(home, notes):
    from medrwr_edge.history import store

    result = store.add(KEY_A, [notes["a.txt"]])
    root = home / "history"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    hdir = root / result.history_id
    assert stat.S_IMODE(hdir.stat().st_mode) == 0o700
    for p in [root / "secret.key", *hdir.iterdir()]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert sorted(p.name for p in hdir.iterdir()) == ["history.enc", "vectors.enc"]


def test_secret_can_live_elsewhere_and_is_needed(home, notes, tmp_path, monkeypatch, capsys):
    from medrwr_edge.errors import MedrwrError
    from medrwr_edge.history import store

    usb = tmp_path / "usb" / "history.key"
    monkeypatch.setenv("MEDRWR_EDGE_HISTORY_SECRET", str(usb))
    store.add(KEY_A, [notes["a.txt"]])
    assert stat.S_IMODE(usb.stat().st_mode) == 0o600 and not (home / "history" / "secret.key").exists()
    assert store.show(KEY_A).passage_count == 3
    monkeypatch.delenv("MEDRWR_EDGE_HISTORY_SECRET")  # the secret's medium is unplugged
    for args in (("history", "show", KEY_A), ("history", "add", KEY_B, notes["b.txt"]), ("history", "list")):
        assert cli(*args) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: the patient history secret") and "is missing" in err, err
    with pytest.raises(MedrwrError, match="secret .* is missing"):
        store.add(KEY_B, [notes["b.txt"]])  # never a second secret that would orphan the stored history
    assert not (home / "history" / "secret.key").exists()


def test_sealed_files_are_bound_to_their_patient_and_tamper_evident(home, notes):
    from medrwr_edge.errors import IntegrityError
    from medrwr_edge.history import store

    a = store.add(KEY_A, [notes["a.txt"]])
    b = store.add(KEY_B, [notes["b.txt"]])
    root = home / "history"
    # A's sealed notes copied over B's: the associated data names the history, so B's history refuses them.
    (root / b.history_id / "history.enc").write_bytes((root / a.history_id / "history.enc").read_bytes())
    with pytest.raises(IntegrityError, match="fails authentication"):
        store.open_history_pack(KEY_B)
    # One flipped byte in A's vectors: refused, not silently used.
    v = root / a.history_id / "vectors.enc"
    data = bytearray(v.read_bytes())
    data[40] ^= 1
    v.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="fails authentication"):
        store.open_history_pack(KEY_A)
    assert sorted(h.damaged for h in store.list_histories()) == [True, True]


# ---------------------------------------------------------------------------------------------- retrieval


def test_isolation_patient_a_notes_never_retrieved_for_patient_b(home, notes, knowledge_packs):
    from medrwr_edge.history import store

    store.add(KEY_A, [notes["a.txt"]], date="2024-03-01")
    store.add(KEY_B, [notes["b.txt"]])
    sha_a = __import__("hashlib").sha256(notes["a.txt"].read_bytes()).hexdigest()[:8]

    # Patient A, a query about A's own record: A's passage is retrieved, first, and says where it came from.
    rec_a = scripted_session_ask([knowledge_packs[0]], KEY_A, "lung nodule follow-up")
    docs = rec_a.retrievals()[0].docs
    assert docs[0].source == "history" and docs[0].pack == "patient-history"
    assert docs[0].doc_id == f"note-{sha_a}-3" and "6 mm nodule" in docs[0].snippet
    assert docs[0].snippet.startswith("Patient history (2024-03-01): ")
    assert [d.source for d in docs[1:]] == ["knowledge:icd-a"] * 2
    history_packs = [p for p in rec_a.packs if p["role"] == "patient-history"]
    assert len(history_packs) == 1 and history_packs[0]["history_id"] == store.resolve(KEY_A)[1]

    # Patient B, the same query and queries naming A's notes word for word: never one of A's passages.
    for query in ("lung nodule follow-up", "tiotropium salbutamol inhaler", "zephyrine cough syrup",
                  "centrilobular emphysema upper lobes"):
        rec_b = scripted_session_ask([knowledge_packs[0]], KEY_B, query)
        docs = rec_b.retrievals()[0].docs
        text = json.dumps([d.__dict__ for d in docs])
        # (the query itself repeats A's words; what was retrieved and spliced must not)
        assert "winter exacerbation" not in rec_b.assistant_text and "18 mcg" not in rec_b.assistant_text
        assert f"note-{sha_a}" not in text and "zephyrine" not in text and "Tiotropium" not in text
        assert store.resolve(KEY_A)[1] not in json.dumps(rec_b.to_dict())
        assert all(d.source != "history" or "diabet" in d.snippet.lower() or "wrist" in d.snippet for d in docs)
    # ...while B's own record is found for B.
    rec_b = scripted_session_ask([knowledge_packs[0]], KEY_B, "fracture of the distal radius")
    assert rec_b.retrievals()[0].docs[0].source == "history" and "wrist" in rec_b.retrievals()[0].docs[0].snippet
    assert KEY_A not in json.dumps(rec_a.to_dict()) and KEY_B not in json.dumps(rec_b.to_dict())


def test_history_keeps_a_slot_among_many_knowledge_packs(home, notes, knowledge_packs):
    """Round-robin over three knowledge packs would push the history out of the top 3; the reserved slot does not."""
    from medrwr_edge.history import store
    from medrwr_edge.history.retrieval import HistoryAwareRetriever
    from medrwr_edge.kb_pack.pack import Pack
    from medrwr_edge.runtime.retrieval import PackTextRetriever

    store.add(KEY_A, [notes["a.txt"]])
    history, _ = store.open_history_pack(KEY_A)
    packs = [Pack.open(p) for p in knowledge_packs]
    try:
        query = "What inhalers does the patient use for the lung disease?"
        plain = PackTextRetriever(packs + [history]).search(query, 3)  # the history as just one more pack
        assert all(d.pack != "patient-history" for d in plain)  # starved
        docs = HistoryAwareRetriever(PackTextRetriever(packs), history).search(query, 3)
        assert len(docs) == 3 and docs[0].source == "history" and "inhaler" in docs[0].snippet
        assert [d.source for d in docs[1:]] == ["knowledge:icd-a", "knowledge:icd-b"]
        # No knowledge packs at all: the history fills every slot it can.
        only = HistoryAwareRetriever(None, history).search("chest CT emphysema nodule and inhalers", 3)
        assert only and all(d.source == "history" for d in only)
    finally:
        for p in packs + [history]:
            p.close()


def test_relevance_floor_keeps_unrelated_notes_out(home, notes, knowledge_packs):
    from medrwr_edge.history import store
    from medrwr_edge.history.retrieval import HistoryAwareRetriever
    from medrwr_edge.kb_pack.pack import Pack
    from medrwr_edge.runtime.retrieval import PackTextRetriever

    store.add(KEY_A, [notes["a.txt"]])
    history, _ = store.open_history_pack(KEY_A)
    pack = Pack.open(knowledge_packs[0])
    try:
        r = HistoryAwareRetriever(PackTextRetriever([pack]), history)
        for related in ("lung nodule follow-up", "hypertension treatment", "emphysema"):
            assert r.search(related, 3)[0].source == "history", related
        # "10" matches "Lisinopril 10 mg" lexically, but the passage is not about appendicitis: not spliced.
        for unrelated in ("ICD-10 code for acute appendicitis", "fracture of the distal radius", "J44.9"):
            assert all(d.source != "history" for d in r.search(unrelated, 3)), unrelated
    finally:
        pack.close()
        history.close()


# ---------------------------------------------------------------------------------------------- deletion


def test_delete_removes_history_and_logged_answers(home, notes, knowledge_packs, capsys):
    from medrwr_edge.evidence.log import AnswerLog, log_path
    from medrwr_edge.history import store

    a = store.add(KEY_A, [notes["a.txt"]])
    store.add(KEY_B, [notes["b.txt"]])
    scripted_session_ask([knowledge_packs[0]], KEY_A, "zephyrine cough syrup exacerbation", log=True)
    scripted_session_ask([knowledge_packs[0]], KEY_B, "wrist fracture", log=True)
    scripted_session_ask([knowledge_packs[0]], None, "pulmonary nodule", log=True)  # no history
    with AnswerLog() as log:
        assert log.count() == 3
    assert b"zephyrine" in log_path().read_bytes() + (Path(str(log_path()) + "-wal").read_bytes()
                                                       if Path(str(log_path()) + "-wal").exists() else b"")

    assert cli("history", "delete", KEY_A, "--yes") == 0
    out = capsys.readouterr().out
    assert f"deleted history {a.history_id} (3 passage(s)) and 1 logged answer(s)" in out
    assert not (home / "history" / a.history_id).exists()
    with AnswerLog() as log:
        assert log.count() == 2  # B's answer and the history-free answer stay
    assert_nowhere(home, b"zephyrine", a.history_id.encode())
    assert len(store.list_histories()) == 1

    # After deletion the key is unknown everywhere: ask, show, delete again.
    from medrwr_edge.errors import InputError

    with pytest.raises(InputError, match="no patient history is stored under the key given"):
        scripted_session_ask([knowledge_packs[0]], KEY_A, "nodule")
    assert cli("history", "delete", KEY_A, "--yes") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no patient history") and KEY_A not in err and len(err.splitlines()) == 1


def test_delete_asks_for_confirmation(home, notes, monkeypatch, capsys):
    from medrwr_edge.history import store

    store.add(KEY_A, [notes["a.txt"]])
    monkeypatch.setattr("typer.confirm", lambda *a, **k: False)
    assert cli("history", "delete", KEY_A) == 1
    assert "error: not deleted" in capsys.readouterr().err
    assert store.show(KEY_A).passage_count == 3


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name, data, match", [
    ("notes.docx", b"PK\x03\x04 a word document", r"unknown history format"),
    ("report.pdf", b"%PDF-1.7\n1 0 obj", r"is a PDF; extract its text first"),
    ("scan.txt", b"%PDF-1.4\n%binary", r"is a PDF"),
    ("latin1.txt", "Patient fühlt sich müde.".encode("latin-1"), r"not valid UTF-8"),
    ("empty.txt", b"  \n\n ", r"is empty"),
    ("nul.txt", b"text\x00with a NUL", r"NUL bytes"),
])
def test_bad_history_files_are_one_clear_error_and_write_nothing(home, tmp_path, capsys, name, data, match):
    import re

    bad = tmp_path / name
    bad.write_bytes(data)
    code = cli("history", "add", KEY_A, bad)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert "Traceback" not in err and name not in err  # files are named by position, never by name
    assert not [p for p in (home / "history").glob("*") if p.is_dir()] if (home / "history").exists() else True


def test_bad_date_and_unknown_key(home, notes, capsys):
    assert cli("history", "add", KEY_A, notes["a.txt"], "--date", "03/01/2024") == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err
    for args in (("history", "show", "nobody"), ("history", "delete", "nobody", "--yes")):
        assert cli(*args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: no patient history is stored under the key given") and "nobody" not in err
    assert cli("history", "add", "  ", notes["a.txt"]) == 2
    assert "patient key is empty" in capsys.readouterr().err
    assert cli("history", "list") == 0
    assert "no patient histories stored" in capsys.readouterr().out


def test_ask_with_unknown_history_key_fails_before_loading_a_model(home, knowledge_packs, capsys):
    code = cli("ask", "-", "Which code?", "-o", "A. J44.9", "-o", "B. I10", "--pack", knowledge_packs[0],
               "--model", "/nonexistent/model.gguf", "--history", "nobody")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: no patient history") and "nobody" not in err


# ---------------------------------------------------------------------------------------------- DICOM SR


def _dicom_sr(path: Path) -> Path:
    """A small Basic Text SR with fake identifiers in the patient module AND inside the content tree."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def code(value, meaning, scheme="DCM"):
        c = Dataset()
        c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
        return c

    def item(value_type, name, **kw):
        it = Dataset()
        it.RelationshipType, it.ValueType = "CONTAINS", value_type
        it.ConceptNameCodeSequence = Sequence([code(*name)])
        for k, v in kw.items():
            setattr(it, k, v)
        return it

    num = Dataset()
    num.NumericValue = "12"
    num.MeasurementUnitsCodeSequence = Sequence([code("mm", "millimeter", "UCUM")])
    findings = item("CONTAINER", ("121070", "Findings"), ContinuityOfContent="SEPARATE", ContentSequence=Sequence([
        item("TEXT", ("121071", "Finding"), TextValue="Small right pleural effusion, new since the prior study."),
        item("CODE", ("121071", "Finding"), ConceptCodeSequence=Sequence([code("36118008", "Pneumothorax", "SCT")])),
        item("NUM", ("410668003", "Length"), MeasuredValueSequence=Sequence([num])),
        item("PNAME", ("121008", "Person Observer Name"), PersonName="Quackenbush^Hieronymus"),
        item("TEXT", ("121030", "Subject ID"), TextValue="SUBJ-ID-424242"),
        item("DATE", ("111060", "Study Date"), Date="19610203"),
    ]))
    impression = item("CONTAINER", ("121072", "Impressions"), ContinuityOfContent="SEPARATE", ContentSequence=Sequence([
        item("TEXT", ("121073", "Impression"), TextValue="Follow-up chest radiograph in six weeks."),
    ]))
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Zzyzx^Wilhelmina", "MRN-98765431", "19610203"
    ds.AccessionNumber, ds.InstitutionName = "ACC-31337", "Saint Nowhere Hospital"
    ds.Modality, ds.SOPClassUID, ds.SOPInstanceUID = "SR", "1.2.840.10008.5.1.4.1.1.88.11", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([code("18748-4", "Diagnostic Imaging Report", "LN")])
    ds.ContentSequence = Sequence([findings, impression])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path


IDENTIFIERS = [b"Zzyzx", b"Wilhelmina", b"MRN-98765431", b"19610203", b"ACC-31337", b"Saint Nowhere", b"Quackenbush",
               b"Hieronymus", b"SUBJ-ID-424242"]


def test_dicom_sr_is_read_without_identifiers(home, tmp_path, knowledge_packs, capsys):
    from medrwr_edge.history import store
    from medrwr_edge.history.sources import read_history_file

    sr = _dicom_sr(tmp_path / "report.dcm")
    src = read_history_file(sr)
    text = "\n".join(src.passages)
    assert src.kind == "dicom-sr"
    for expected in ("Findings:", "Finding: Small right pleural effusion", "Finding: Pneumothorax", "Length: 12 mm",
                     "Impression: Follow-up chest radiograph in six weeks."):
        assert expected in text, text
    assert not any(i.decode() in text for i in IDENTIFIERS)

    assert cli("history", "add", KEY_A, sr, "--date", "2024-05-06") == 0
    assert cli("history", "show", KEY_A) == 0
    rec = scripted_session_ask([knowledge_packs[0]], KEY_A, "pleural effusion", log=True)
    out = capsys.readouterr()
    assert rec.retrievals()[0].docs[0].source == "history" and "pleural effusion" in rec.retrievals()[0].docs[0].snippet
    # Identifiers reach neither the sealed history (decrypted), the record, the output nor any file.
    secret, hid, path = store.resolve(KEY_A)
    state = json.dumps(store.load_state(secret, hid, path).to_json()).encode()
    blobs = [state, json.dumps(rec.to_dict()).encode(), out.out.encode(), out.err.encode()]
    for ident in IDENTIFIERS:
        assert all(ident not in b for b in blobs), ident
    assert_nowhere(home, *IDENTIFIERS)


def test_a_dicom_image_is_not_a_report(home, capsys):
    import pydicom.data

    assert cli("history", "add", KEY_A, pydicom.data.get_testdata_file("CT_small.dcm")) == 2
    err = capsys.readouterr().err
    assert "not a structured report (modality CT)" in err and "CT_small" not in err


def test_chunking_windows_long_paragraphs_and_joins_headings():
    from medrwr_edge.history.sources import MAX_WORDS, chunk_text

    long = " ".join(f"Sentence {i} says something about the left kidney." for i in range(60))
    passages = chunk_text(f"Findings:\n\n{long}\n\nShort closing remark.")
    assert passages[0].startswith("Findings: Sentence 0")
    assert all(len(p.split()) <= MAX_WORDS for p in passages) and len(passages) >= 4
    assert " ".join(passages).split() == f"Findings: {long} Short closing remark.".split()  # nothing lost


# ------------------------------------------------------------------------------------- a real small model


@pytest.mark.real_model
@pytest.mark.slow  # ~70 s on the shared 2-core machine (the 248-token prompt prefill dominates)
def test_cli_ask_with_history_on_a_real_model(home, notes, knowledge_packs, smoke_gguf, monkeypatch, capsys):
    """SmolLM2-135M (forced to query, then left to write its answer pass itself) through `medrwr-edge ask
    --history`: the history passage is spliced first, named as history in the record, the answer is logged and
    tagged, and `history delete` then removes that logged answer."""
    from forcing import ForcedPasses
    from test_ask import _real_backend

    from medrwr_edge.evidence.log import AnswerLog
    from medrwr_edge.runtime import backends

    assert cli("history", "add", KEY_A, notes["a.txt"], "--date", "2024-03-01") == 0
    capsys.readouterr()
    forced = {0: "<think> Check the patient's record for the nodule. </think>\n<query> lung nodule follow-up </query>"}
    monkeypatch.setattr(backends, "load_backend", lambda model, settings: ForcedPasses(_real_backend(smoke_gguf), forced))
    code = cli("ask", "-", "Is follow-up imaging of the lung nodule planned?", "-o", "A. Yes", "-o", "B. No",
               "--pack", knowledge_packs[0], "--model", smoke_gguf, "--history", KEY_A, "--max-tokens", "24",
               "--ctx", "4096", "--threads", "1", "--no-cdir", "--json")
    out = capsys.readouterr()
    assert code == 0, out.err
    rec = json.loads(out.out)
    retrieve = next(s for s in rec["steps"] if s["type"] == "retrieve")
    assert retrieve["docs"][0]["source"] == "history" and "6 mm nodule" in retrieve["docs"][0]["snippet"]
    assert "(1) Patient history (2024-03-01):" in rec["assistant_text"]
    assert rec["passes"][1]["generated_tokens"] > 0  # the real model wrote on after reading its history
    hp = [p for p in rec["packs"] if p["role"] == "patient-history"]
    assert len(hp) == 1 and KEY_A not in out.out + out.err
    assert "logged as #1" in out.err

    assert cli("history", "delete", KEY_A, "--yes") == 0
    assert "1 logged answer(s)" in capsys.readouterr().out
    with AnswerLog() as log:
        assert log.count() == 0


def test_reopening_the_history_a_record_used(home, notes, knowledge_packs):
    """What replay needs: the same key and the same history state, or a clear refusal."""
    from medrwr_edge.errors import InputError
    from medrwr_edge.history import store

    store.add(KEY_A, [notes["a.txt"]])
    store.add(KEY_B, [notes["b.txt"]])
    rec = scripted_session_ask([knowledge_packs[0]], KEY_A, "lung nodule")
    entry = next(p for p in rec.packs if p["role"] == "patient-history")
    pack, _ = store.open_history_for_record(KEY_A, entry)
    pack.close()
    with pytest.raises(InputError, match="different patient"):
        store.open_history_for_record(KEY_B, entry)
    store.add(KEY_A, [notes["a2.md"]])
    with pytest.raises(InputError, match="changed since this answer .revision r1 then, r2 now"):
        store.open_history_for_record(KEY_A, entry)


def test_replay_of_an_answer_that_searched_a_history(home, notes, knowledge_packs):
    """replay needs the patient's key (--history) and refuses a missing, wrong or changed history."""
    from medrwr_edge.errors import InputError
    from medrwr_edge.evidence.replay import replay
    from medrwr_edge.history import store
    from medrwr_edge.runtime.scripted_backend import ScriptedBackend

    store.add(KEY_A, [notes["a.txt"]])
    store.add(KEY_B, [notes["b.txt"]])
    rec = scripted_session_ask([knowledge_packs[0]], KEY_A, "lung nodule")

    def again():
        return ScriptedBackend(["<think> check the record </think>\n<query> lung nodule </query>", "<answer> A </answer>"])

    result = replay(rec, backend=again(), history=KEY_A)
    assert result.identical, result.differences
    assert any(line.startswith("patient history ") for line in result.verified)
    with pytest.raises(InputError, match="give the patient's key with --history"):
        replay(rec, backend=again())
    with pytest.raises(InputError, match="different patient"):
        replay(rec, backend=again(), history=KEY_B)


def test_chat_searches_the_patient_history_too(home, notes, knowledge_packs):
    from medrwr_edge.history import store
    from medrwr_edge.runtime.chat import Chat
    from medrwr_edge.runtime.scripted_backend import ScriptedBackend

    store.add(KEY_A, [notes["a.txt"]])
    be = ScriptedBackend(["lung nodule </query>", "<answer> follow up the nodule </answer>"])
    with Chat(packs=[knowledge_packs[0]], backend=be, history=KEY_A) as chat:
        turn = chat.send("What did the last CT show about the lung nodule?")
    assert any(d.source == "history" for d in turn.sources())
    assert KEY_A not in json.dumps(chat.record())
