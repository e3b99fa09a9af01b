"""The answer log: append and query, privacy, switching off, schema migrations, concurrent writers, `logs` CLI."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from evidence_helpers import (  # noqa: F401  (fixtures)
    assert_valid,
    evidence_packs,
    fake_encoders,
    input_png,
    run_scripted,
)
from medrwr_edge.errors import InputError, MedrwrError
from medrwr_edge.evidence import log as answer_log
from medrwr_edge.evidence.log import AnswerLog, append_record, log_if_enabled, logging_enabled, read_logged_record
from medrwr_edge.evidence.privacy import scrub_record

CLI_MAIN = "from medrwr_edge.cli import main; main()"  # what the `medrwr-edge` console script runs


@pytest.fixture
def record(evidence_packs, fake_encoders, input_png, medrwr_home):
    text_pack, image_pack, _ = evidence_packs
    return run_scripted(text_pack, image_pack, input_png)


def test_append_list_query_and_read_back(record, medrwr_home):
    first = append_record(record)
    rec2 = record.to_dict()
    rec2["question"] = "Is there a pleural effusion?"
    rec2["answer"], rec2["letter"], rec2["confidence"] = "C", "C", 0.61
    for step in rec2["steps"]:
        if step["type"] == "query":
            step["text"] = step["raw"] = "pleural fluid"
    second = append_record(rec2, command="eval")
    assert second == first + 1
    assert (medrwr_home / "answers.sqlite").is_file()
    with AnswerLog() as log:
        newest, oldest = log.entries()
        assert (newest.id, newest.command, newest.letter) == (second, "eval", "C")
        assert (oldest.id, oldest.command, oldest.letter, oldest.confidence) == (first, "ask", "A", 0.93)
        assert oldest.queries == ["pneumothorax"] and oldest.cdir_changed is True
        assert oldest.image_sha256 == [record.images[0]["sha256"]]
        assert [e.id for e in log.entries(n=1)] == [second]
        assert [e.id for e in log.entries(query="EFFUSION")] == [second]  # question, case-insensitive
        assert [e.id for e in log.entries(query="pneumothorax")] == [first]  # the model's query
        assert [e.id for e in log.entries(query=record.images[0]["sha256"][:12])] == [second, first]
        assert log.entries(query="100%_") == []  # LIKE wildcards are literal
        assert log.schema_version() == answer_log.SCHEMA_VERSION
    back = read_logged_record(first)
    assert back["assistant_text"] == record.assistant_text and back["steps"] == record.to_dict()["steps"]
    assert_valid(back)
    with pytest.raises(InputError, match="no answer with log id 999"):
        read_logged_record(999)


def test_logging_switches(monkeypatch, record, medrwr_home):
    monkeypatch.delenv("MEDRWR_EDGE_NO_LOG", raising=False)
    assert logging_enabled() and not logging_enabled(no_log=True)
    for value in ("1", "true", "YES", "on"):
        monkeypatch.setenv("MEDRWR_EDGE_NO_LOG", value)
        assert not logging_enabled()
        assert log_if_enabled(record) is None
    assert not (medrwr_home / "answers.sqlite").exists()
    monkeypatch.setenv("MEDRWR_EDGE_NO_LOG", "0")
    assert logging_enabled()
    assert log_if_enabled(record, no_log=True) is None and not (medrwr_home / "answers.sqlite").exists()
    assert log_if_enabled(record) == 1


def test_no_patient_identifiers_are_stored(evidence_packs, fake_encoders, medrwr_home):
    import pydicom
    import pydicom.data

    dcm = pydicom.data.get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(dcm)
    identifiers = [str(ds.PatientName), str(ds.PatientID), str(ds.get("PatientBirthDate", "")),
                   str(ds.get("InstitutionName", "")), str(ds.StudyDate)]
    identifiers = [i for i in identifiers if len(i) >= 4]
    assert len(identifiers) >= 3
    rec = run_scripted(evidence_packs[0], None, dcm)
    log_id = append_record(rec)
    logged = read_logged_record(log_id)
    (image,) = logged["images"]
    assert set(image) == {"sha256", "role", "format", "width", "height", "meta"}
    assert "study_date" not in image["meta"] and image["meta"].get("study_year") == str(ds.StudyDate)[:4]
    assert image["meta"].get("modality") == "CT"
    # nothing identifying anywhere in the database file (WAL included)
    blob = b"".join(p.read_bytes() for p in medrwr_home.glob("answers.sqlite*"))
    for ident in identifiers:
        assert ident.encode() not in blob, ident


def _v1_database(path: Path, record: dict) -> None:
    """A log as the first schema version wrote it (migration 1 only), with one entry."""
    conn = sqlite3.connect(path, isolation_level=None)
    answer_log.migrate(conn, target=1)
    conn.execute(
        "INSERT INTO answers (logged, command, question, answer, letter, confidence, status, model_name, "
        "model_sha256, record_json) VALUES ('2026-01-01T00:00:00Z', 'ask', ?, ?, ?, ?, ?, 'old.gguf', ?, ?)",
        (record["question"], record["answer"], record["letter"], record["confidence"], record["status"],
         record["model"]["sha256"], json.dumps(record)),
    )
    conn.close()


def test_old_log_is_migrated_in_place(record, medrwr_home):
    medrwr_home.mkdir(parents=True)
    path = medrwr_home / "answers.sqlite"
    _v1_database(path, scrub_record(record))
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert "queries" not in [r[1] for r in conn.execute("PRAGMA table_info(answers)")]
    conn.close()
    with AnswerLog() as log:
        assert log.schema_version() == answer_log.SCHEMA_VERSION == 2
        (old,) = log.entries()
        # the new search columns were backfilled from the stored record
        assert old.queries == ["pneumothorax"] and old.cdir_changed is True and old.model_name == "old.gguf"
        assert [e.id for e in log.entries(query="pneumothorax")] == [old.id]
        new_id = log.append(record)
        assert new_id == old.id + 1
    assert read_logged_record(old.id)["question"] == record.question


def test_newer_or_damaged_log_is_refused_with_one_line(record, medrwr_home):
    medrwr_home.mkdir(parents=True)
    path = medrwr_home / "answers.sqlite"
    append_record(record)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(MedrwrError, match="newer medrwr-edge") as e:
        append_record(record)
    assert "\n" not in str(e.value)
    for p in medrwr_home.glob("answers.sqlite*"):
        p.unlink()
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(MedrwrError, match="damaged or not a SQLite database"):
        append_record(record)
    assert path.read_bytes() == b"this is not a database" * 100  # left as it was, for the user to look at


def test_records_that_are_not_evidence_are_refused(medrwr_home):
    with pytest.raises(InputError):
        append_record({"schema": "medrwr-edge/evidence/1", "question": "q"})
    with pytest.raises(ValueError):
        append_record({"schema": "medrwr-edge/evidence/1"}, command="rm -rf")


WRITER = """
import json, sys
from medrwr_edge.evidence.log import append_record
record = json.load(open(sys.argv[1]))
sys.stdin.readline()  # start together
ids = [append_record(record, command="eval") for _ in range(int(sys.argv[2]))]
print(json.dumps(ids))
"""


def test_concurrent_writers_all_succeed(record, medrwr_home, tmp_path):
    """Several processes open a NEW log at the same moment and append; every append lands, ids are unique."""
    rec_file = tmp_path / "rec.json"
    rec_file.write_text(json.dumps(record.to_dict()), "utf-8")
    env = {**os.environ, "MEDRWR_EDGE_HOME": str(medrwr_home), "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(rec_file), "25"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    outs = []
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs += json.loads(out)
    assert len(outs) == len(set(outs)) == 100
    with AnswerLog() as log:
        assert log.count() == 100
    conn = sqlite3.connect(medrwr_home / "answers.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_cli_logs(record, medrwr_home):
    from typer.testing import CliRunner

    from medrwr_edge.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["logs"])
    assert res.exit_code == 0 and "no answers logged yet" in res.output
    assert not (medrwr_home / "answers.sqlite").exists()  # reading never creates the log
    ids = [append_record(record) for _ in range(3)]
    res = runner.invoke(app, ["logs", "--json", "-n", "2"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert_valid(doc, "answer-log")
    assert [e["id"] for e in doc["entries"]] == ids[::-1][:2]
    res = runner.invoke(app, ["logs", "--json", "--query", "no such thing"])
    assert json.loads(res.stdout)["entries"] == []
    res = runner.invoke(app, ["logs", "-n", "0"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "pneumothorax" in res.output and all(str(i) in res.output for i in ids)
    res = runner.invoke(app, ["logs", "--id", str(ids[0])])
    assert res.exit_code == 0
    assert_valid(json.loads(res.stdout))


def test_cli_logs_errors_are_one_line(tmp_path, medrwr_home):
    env = {**os.environ, "MEDRWR_EDGE_HOME": str(medrwr_home)}
    for args in (["logs", "--id", "7"], ["logs", "-n", "-1"]):
        proc = subprocess.run([sys.executable, "-c", CLI_MAIN, *args], capture_output=True, text=True, env=env)
        lines = [l for l in proc.stderr.splitlines() if l.strip()]
        assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
