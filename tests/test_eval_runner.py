"""The runner: summary statistics on a scripted backend with known answers, resume after interruption, torn
journal lines, and the CLI's bad-input behaviour. Retrieval and CDIR search real packs built with the fast
stand-in encoders of tests/pack_fakes.py."""

from __future__ import annotations

import json
import pytest
from PIL import Image

from medrwr_edge.errors import InputError, MedrwrError
from medrwr_edge.eval.datasets import EvalItem
from medrwr_edge.eval.runner import mcnemar_exact_p, read_records, run_eval, summarize, wilson_interval
from medrwr_edge.kb_pack.build import build_image_pack, build_text_pack
from medrwr_edge.kb_pack.documents import Document
from medrwr_edge.kb_pack.pack import Pack
from medrwr_edge.runtime.api import AskSettings, Session
from medrwr_edge.runtime.scripted_backend import ScriptedBackend
from pack_fakes import ColorHistogramEncoder, HashingTextEncoder


class ByQuestion(ScriptedBackend):
    """Plays a script chosen by a key found in the prompt, so many questions can share one session.

    A scripted output may be {"docs": text, "none": text}: which one plays depends on whether the retrieve block
    in the turn held documents (retrieval on) or "None" (retrieval off)."""

    def __init__(self, scripts: dict, interrupt_on_prefill: int | None = None, n_ctx: int = 8192):
        super().__init__([], n_ctx=n_ctx)
        self.scripts = scripts
        self.prefill_count = 0
        self.interrupt_on_prefill = interrupt_on_prefill

    def prefill(self, prompt):
        self.prefill_count += 1
        if self.prefill_count == self.interrupt_on_prefill:
            raise KeyboardInterrupt  # Ctrl-C in the middle of an item
        n = super().prefill(prompt)
        key = next(k for k in self.scripts if k in self.cache_text())
        outputs, self.probs = self.scripts[key]
        self.outputs = [o if isinstance(o, str) else o["none"] for o in outputs]
        self._choices = outputs
        return n

    def generate(self, settings, stop, on_piece=None):
        choice = self._choices[self.calls] if self.calls < len(self._choices) else ""
        if isinstance(choice, dict):
            self.outputs[self.calls] = choice["none" if "<retrieve> None" in self.cache_text() else "docs"]
        return super().generate(settings, stop, on_piece)


SCRIPTS = {
    "Q-easy": (["<answer> A </answer>"], {}),
    "Q-needs-retrieval": (["<think> t </think>\n<query> pneumothorax </query>",
                           {"docs": "<answer> B </answer>", "none": "<answer> C </answer>"}], {}),
    "Q-cdir-fixes": (["<answer> C </answer>", "<answer> D </answer>"], {"C": 0.3}),
    "Q-cdir-breaks": (["<answer> A </answer>", "<answer> B </answer>"], {"A": 0.5}),
    "Q-no-answer": (["I am not sure."], {}),
    "Q-open": (["<answer> 1. Mesenteric adenitis\n2. Acute appendicitis </answer>"], {}),
}
OPTS = ["A. Pneumothorax", "B. Asthma", "C. Croup", "D. Influenza"]


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalpacks")
    docs = [Document(id="J93.0", text="J93.0 Spontaneous tension pneumothorax", title="Spontaneous tension pneumothorax"),
            Document(id="J45", text="J45 Asthma", title="Asthma"),
            Document(id="J05.0", text="J05.0 Acute obstructive laryngitis [croup]", title="Croup")]
    text = build_text_pack(docs, root / "text", HashingTextEncoder(), name="tiny-icd", version="t", progress=False)
    images = []
    for name, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        p = root / f"{name}.png"
        Image.new("RGB", (16, 16), colour).save(p)
        images.append(Document(id=f"ref-{name}", text=f"a {name} image", image_path=str(p),
                               caption=f"Reference: a {name} square"))
    image = build_image_pack(images, root / "img", ColorHistogramEncoder(), name="tiny-ref", version="t",
                             progress=False)
    query = root / "query.png"  # mostly red, not a copy of the red reference (CDIR skips copies of the input)
    im = Image.new("RGB", (16, 16), (210, 30, 30))
    im.paste((20, 20, 220), (0, 0, 4, 16))
    im.save(query)
    return text, image, str(query)


@pytest.fixture
def items(packs):
    _, _, img = packs
    return [
        EvalItem("q1", "Q-easy: which?", OPTS, "A", ["Pneumothorax"]),
        EvalItem("q2", "Q-needs-retrieval: which?", OPTS, "B", ["Asthma"]),
        EvalItem("q3", "Q-cdir-fixes: which?", OPTS, "D", ["Influenza"], [img]),
        EvalItem("q4", "Q-cdir-breaks: which?", OPTS, "A", ["Pneumothorax"], [img]),
        EvalItem("q5", "Q-no-answer: which?", OPTS, "A", ["Pneumothorax"]),
        EvalItem("q6", "Q-open: diagnosis?", gold=["Appendicitis", "appendicitis, acute"]),
    ]


def _session(packs, backend, **settings):
    text, image, _ = packs
    session = Session(packs=[], backend=backend, settings=AskSettings(**settings))
    # The stand-in encoders are not installed models, so the packs are opened with them and handed over.
    session.text_packs = [Pack.open(text, encoder=HashingTextEncoder())]
    session.image_pack = Pack.open(image, encoder=ColorHistogramEncoder())
    return session


def _stable(summary):
    s = json.loads(json.dumps(summary))
    s.pop("created", None)
    for m in s["modes"].values():
        m.pop("seconds_per_question")
    return s


def test_summary_statistics_on_known_answers(packs, items, tmp_path, medrwr_home):
    with _session(packs, ByQuestion(SCRIPTS)) as session:
        summary = run_eval(items, session, tmp_path / "out")
    m = summary["modes"]
    plain, ret, cdir = m["plain"], m["retrieval"], m["retrieval+cdir"]
    assert (plain["correct"], ret["correct"], cdir["correct"]) == (2, 3, 3)
    assert plain["mcq_items"] == 5 and plain["accuracy"] == 0.4
    assert plain["accuracy_ci95"] == [0.1176, 0.7693]  # Wilson interval for 2/5
    assert (plain["no_answer"], plain["answered"], plain["errors"]) == (1, 5, 0)
    assert plain["retrieval_rate"] == 0.0 and ret["retrieval_rate"] == round(1 / 6, 4)
    assert plain["queries_per_question"] == ret["queries_per_question"] == round(1 / 6, 4)
    assert ret["cdir_triggered"] == 0
    assert (cdir["cdir_triggered"], cdir["cdir_changed"]) == (2, 2)
    assert (cdir["cdir_wrong_to_right"], cdir["cdir_right_to_wrong"]) == (1, 1)
    assert cdir["cdir_trigger_rate"] == round(2 / 6, 4)
    assert plain["open_items"] == 1 and (plain["open_top1"], plain["open_top5"]) == (0, 1)
    assert plain["tokens_generated_per_question"] > 0
    pairs = {(p["from"], p["to"]): p for p in summary["paired"]}
    p = pairs[("plain", "retrieval")]
    assert (p["wrong_to_right"], p["right_to_wrong"], p["items"]) == (1, 0, 6)
    p = pairs[("retrieval", "retrieval+cdir")]
    assert (p["wrong_to_right"], p["right_to_wrong"], p["mcnemar_p"]) == (1, 1, 1.0)
    # the files: one journal line per (item, mode) holding the full evidence record; the summary on disk
    records = read_records(tmp_path / "out" / "records.jsonl")
    assert len(records) == 18 and len({(r["item_id"], r["mode"]) for r in records}) == 18
    q3 = next(r for r in records if r["item_id"] == "q3" and r["mode"] == "retrieval+cdir")
    assert q3["cdir"]["letter_before"] == "C" and q3["cdir"]["letter_after"] == "D" and q3["correct"]
    assert q3["cdir"]["reference_doc_id"] == "ref-red"
    assert q3["evidence"]["schema"] == "medrwr-edge/evidence/1" and q3["evidence"]["settings"]["cdir"] is True
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert _stable(on_disk) == _stable(summary)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["model"]["backend"] == "scripted" and run["items"] == 6


def test_resume_after_interruption_gives_the_same_summary(packs, items, tmp_path, medrwr_home):
    with _session(packs, ByQuestion(SCRIPTS)) as session:
        straight = run_eval(items, session, tmp_path / "straight")
    out = tmp_path / "resumed"
    with _session(packs, ByQuestion(SCRIPTS, interrupt_on_prefill=8)) as session:
        with pytest.raises(KeyboardInterrupt):
            run_eval(items, session, out)
    assert len(read_records(out / "records.jsonl")) == 7  # the 8th answer was in flight
    seen = []
    with _session(packs, ByQuestion(SCRIPTS)) as session:
        resumed = run_eval(items, session, out, on_record=seen.append)
    assert len(seen) == 11  # only what was missing was asked
    assert _stable(resumed) == _stable(straight)
    # running again asks nothing
    with _session(packs, ByQuestion(SCRIPTS)) as session:
        again = run_eval(items, session, out, on_record=seen.append)
    assert len(seen) == 11 and _stable(again) == _stable(straight)


def test_a_torn_last_line_is_cut_and_redone(packs, items, tmp_path, medrwr_home):
    out = tmp_path / "torn"
    with _session(packs, ByQuestion(SCRIPTS)) as session:
        full = run_eval(items[:2], session, out, ["plain"])
    journal = out / "records.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[0] + lines[1][: len(lines[1]) // 2])  # power cut half-way through line 2
    assert len(read_records(journal, repair=False)) == 1
    with _session(packs, ByQuestion(SCRIPTS)) as session:
        again = run_eval(items[:2], session, out, ["plain"])
    assert len(journal.read_bytes().splitlines()) == 2
    assert _stable(again) == _stable(full)
    journal.write_bytes(b"garbage\n" + journal.read_bytes())
    with pytest.raises(MedrwrError, match="line 1 is not a complete record"):
        read_records(journal)


def test_resume_refuses_a_different_run(packs, items, tmp_path, medrwr_home):
    out = tmp_path / "o"
    with _session(packs, ByQuestion(SCRIPTS)) as session:
        run_eval(items[:1], session, out, ["plain"])
    with _session(packs, ByQuestion(SCRIPTS), max_tokens=64) as session:
        with pytest.raises(InputError, match="different settings"):
            run_eval(items[:1], session, out, ["plain"])
        summary = run_eval(items[:1], session, out, ["plain"], restart=True)
    assert summary["modes"]["plain"]["n"] == 1
    # a run written before a setting existed resumes when today's value is that setting's default
    run = json.loads((out / "run.json").read_text())
    del run["settings"]["top_k_docs"]
    (out / "run.json").write_text(json.dumps(run))
    with _session(packs, ByQuestion(SCRIPTS), max_tokens=64) as session:
        run_eval(items[:1], session, out, ["plain"])
    changed = [EvalItem("q1", "Q-easy: which one?", OPTS, "A", ["Pneumothorax"])]
    with _session(packs, ByQuestion(SCRIPTS), max_tokens=64) as session:
        with pytest.raises(InputError, match="different dataset"):
            run_eval(changed, session, out, ["plain"])
        # the same file name and hash but an item that reads differently: caught item by item
        same = {"name": "d.jsonl", "sha256": "s"}
        run_eval(items[:1], session, out, ["plain"], dataset=same, restart=True)
        with pytest.raises(InputError, match="item q1 has changed"):
            run_eval(changed, session, out, ["plain"], dataset=same)
        with pytest.raises(InputError, match="unknown mode"):
            run_eval(items, session, out, ["plain", "bogus"])


def test_plain_answers_can_be_joined_by_pack_modes_later(packs, items, tmp_path, medrwr_home):
    out = tmp_path / "joined"
    plain_only = Session(packs=[], backend=ByQuestion(SCRIPTS), settings=AskSettings(retrieval=False, cdir=False))
    with plain_only:
        run_eval(items, plain_only, out, ["plain"])
    with _session(packs, ByQuestion(SCRIPTS)) as session:
        session.pack_records = [{"name": "tiny-icd"}]  # now the run has packs
        summary = run_eval(items, session, out, ["retrieval"])
    assert list(summary["modes"]) == ["plain", "retrieval"]
    assert summary["paired"][0]["wrong_to_right"] == 1
    with _session(packs, ByQuestion(SCRIPTS)) as session:
        session.pack_records = [{"name": "another-pack"}]
        with pytest.raises(InputError, match="different set of packs"):
            run_eval(items, session, out, ["retrieval+cdir"])


def test_an_item_that_fails_is_recorded_as_an_error_and_the_run_goes_on(packs, tmp_path, medrwr_home):
    bad = [EvalItem("long", "Q-easy " + "word " * 3000, OPTS, "A", ["x"]),
           EvalItem("q1", "Q-easy: which?", OPTS, "A", ["Pneumothorax"])]
    with _session(packs, ByQuestion(SCRIPTS, n_ctx=1024), max_tokens=64) as session:
        summary = run_eval(bad, session, tmp_path / "e", ["plain"])
    s = summary["modes"]["plain"]
    assert (s["errors"], s["correct"], s["n"]) == (1, 1, 2)
    rec = read_records(tmp_path / "e" / "records.jsonl")[0]
    assert rec["status"] == "error" and "too many for the model's context" in rec["error"]


def test_wilson_and_mcnemar_by_hand():
    assert [round(x, 4) for x in wilson_interval(0, 10)] == [0.0, 0.2775]
    assert [round(x, 4) for x in wilson_interval(10, 10)] == [0.7225, 1.0]
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert mcnemar_exact_p(0, 5) == 0.0625  # 2 * (1/2)^5
    assert mcnemar_exact_p(0, 0) == 1.0 and mcnemar_exact_p(3, 3) == 1.0
    assert summarize([], ["plain"])["modes"]["plain"]["accuracy"] is None


# ------------------------------------------------------------------ CLI


def test_eval_commands_register_on_a_typer_app():
    import typer
    from typer.testing import CliRunner

    from medrwr_edge.eval.cli import register

    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["eval", "--help"])
    assert res.exit_code == 0 and "--modes" in res.output and "builtin:icd10" in res.output


def test_cli_bad_inputs_are_one_line_errors(tmp_path):
    import typer
    from typer.testing import CliRunner

    from medrwr_edge.eval.cli import register

    app = typer.Typer()
    register(app)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "options": ["A. x", "B. y"], "answer": "Q"}\n', "utf-8")
    res = CliRunner().invoke(app, ["eval", str(bad), "--model", "x.gguf"])
    assert isinstance(res.exception, InputError) and "no valid items" in str(res.exception)
    res = CliRunner().invoke(app, ["eval", str(bad), "--workers", "4"])
    assert isinstance(res.exception, InputError) and "--workers 4 is refused" in str(res.exception)
    res = CliRunner().invoke(app, ["eval", "builtin:nope"])
    assert isinstance(res.exception, InputError) and "unknown built-in set" in str(res.exception)
    res = CliRunner().invoke(app, ["eval", str(bad), "--modes", "plain,bogus"])
    assert isinstance(res.exception, InputError) and "unknown mode 'bogus'" in str(res.exception)
    res = CliRunner().invoke(app, ["eval", str(bad), "--shard", "5/4"])
    assert isinstance(res.exception, InputError) and "--shard" in str(res.exception)


def test_eval_summary_merges_shards(packs, items, tmp_path, medrwr_home):
    import typer
    from typer.testing import CliRunner

    from medrwr_edge.eval.cli import register

    for k in (0, 1):
        with _session(packs, ByQuestion(SCRIPTS)) as session:
            run_eval(items[k::2], session, tmp_path / f"shard{k}", dataset={"name": "d", "sha256": "s"})
    with _session(packs, ByQuestion(SCRIPTS)) as session:
        whole = run_eval(items, session, tmp_path / "whole")
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["eval-summary", str(tmp_path / "shard0"), str(tmp_path / "shard1"), "--json"])
    assert res.exit_code == 0, res.output
    merged = json.loads(res.stdout)
    assert _stable(merged)["modes"] == _stable(whole)["modes"]
    assert merged["paired"] == whole["paired"]


@pytest.mark.real_model
def test_real_model_on_the_builtin_benchmark_via_the_cli(smoke_gguf, small_icd_pack, tmp_path, medrwr_home):
    import typer
    from typer.testing import CliRunner

    from medrwr_edge.eval.cli import register

    app = typer.Typer()
    register(app)
    out = tmp_path / "real"
    args = ["eval", "builtin:icd10", "--limit", "2", "--modes", "plain,retrieval", "--model", str(smoke_gguf),
            "--pack", str(small_icd_pack), "--max-tokens", "24", "--ctx", "2048", "--out", str(out), "--json",
            "--no-progress", "--protocol", "native"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["modes"]["plain"]["n"] == 2 and summary["modes"]["retrieval"]["n"] == 2
    assert summary["run"]["model"]["sha256"] and summary["modes"]["plain"]["tokens_generated_per_question"] > 0
    records = read_records(out / "records.jsonl")
    assert len(records) == 4 and all(r["evidence"]["model"]["backend"] != "scripted" for r in records)
    res = CliRunner().invoke(app, args)  # resume: nothing left to do, same numbers
    assert res.exit_code == 0 and len(read_records(out / "records.jsonl")) == 4
    assert json.loads(res.stdout)["modes"]["plain"]["correct"] == summary["modes"]["plain"]["correct"]


@pytest.mark.real_model
def test_real_model_guided_eval_searches_every_question_and_answers_letters(smoke_gguf, small_icd_pack, tmp_path,
                                                                           medrwr_home_with_encoders):
    import typer
    from typer.testing import CliRunner

    from medrwr_edge.eval.cli import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(app, ["eval", "builtin:icd10", "--limit", "3", "--modes", "plain,rag,retrieval",
                                   "--model", str(smoke_gguf), "--pack", str(small_icd_pack), "--ctx", "2048",
                                   "--out", str(tmp_path / "g"), "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    modes = json.loads(res.stdout)["modes"]
    for mode in ("plain", "rag", "retrieval"):
        assert modes[mode]["answered"] == 3 and modes[mode]["letters_from_option_text"] == 0
    assert modes["retrieval"]["retrieval_rate"] == 1.0 and modes["rag"]["retrieval_rate"] == 1.0
    assert modes["plain"]["retrieval_rate"] == 0.0
    records = read_records(tmp_path / "g" / "records.jsonl")
    assert {r["evidence"]["protocol"] for r in records} == {"guided", "rag"}


def test_summary_table_prints_every_mode(packs, items, tmp_path, medrwr_home, capsys):
    from medrwr_edge.eval.cli import print_summary

    with _session(packs, ByQuestion(SCRIPTS)) as session:
        summary = run_eval(items, session, tmp_path / "t", ["plain", "retrieval+cdir"])
    print_summary(summary, tmp_path / "t")
    out = capsys.readouterr().out
    assert "plain" in out and "retrieval+cdir" in out and "40.0% (11.8%–76.9%)" in out
    assert "plain → retrieval+cdir on 6 items: 2 wrong→right, 1 right→wrong" in out


def test_option_text_answers_are_scored_and_counted_apart(packs, tmp_path, medrwr_home):
    scripts = {"Q-text": (["<answer> Asthma </answer>"], {})}
    item = [EvalItem("t1", "Q-text: which?", OPTS, "B", ["Asthma"])]
    with _session(packs, ByQuestion(scripts)) as session:
        s = run_eval(item, session, tmp_path / "txt", ["plain"])["modes"]["plain"]
    # strict (the paper's leading-letter rule) is the headline; the option's text counts only as lenient
    assert (s["correct"], s["letters_from_option_text"], s["correct_by_option_text"]) == (0, 1, 1)
    assert (s["accuracy"], s["accuracy_lenient"]) == (0.0, 1.0)
    rec = read_records(tmp_path / "txt" / "records.jsonl")[0]
    assert rec["predicted_letter"] == "B" and rec["letter_source"] == "option-text"
    assert rec["correct"] is False and rec["correct_lenient"] is True
    from medrwr_edge.runtime.protocol import answer_letter

    assert answer_letter(rec["answer"], list("ABCD")) is None  # the paper's strict rule would not count it
