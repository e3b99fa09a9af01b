"""AskSettings: checked once when made, defaulted in one place, errors named by field and worded by each front end."""

from __future__ import annotations

import dataclasses
import json

import pytest

from medrwr_edge.errors import SettingError
from medrwr_edge.runtime.cli_options import FLAGS, flag
from medrwr_edge.runtime.loop import LoopConfig
from medrwr_edge.runtime.settings import AskSettings, Question


@pytest.mark.parametrize("changes, field", [
    ({"cdir_threshold": 1.5}, "cdir_threshold"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"top_k_docs": 0}, "top_k_docs"), ({"n_ctx": 100}, "n_ctx"),
    ({"n_threads": 0}, "n_threads"), ({"frame": -1}, "frame"), ({"protocol": "x"}, "protocol"),
    ({"search_mode": "fuzzy"}, "search_mode"), ({"speculative": "fast"}, "speculative"),
    ({"engine_timeout": 0}, "engine_timeout"), ({"top_k_diagnoses": 11}, "top_k_diagnoses"),
    ({"seed": "7"}, "seed"), ({"retrieval": 1}, "retrieval"), ({"max_tokens": True}, "max_tokens"),
    ({"temperature": float("nan")}, "temperature"),
])
def test_a_bad_setting_is_refused_on_construction_and_on_replace_naming_its_field(changes, field):
    for make in (lambda: AskSettings(**changes), lambda: AskSettings().replace(**changes)):
        with pytest.raises(SettingError) as info:
            make()
        assert info.value.field == field and str(info.value).startswith(field + " ")


def test_settings_are_frozen_and_replace_gives_a_checked_copy():
    base = AskSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.cdir = False
    changed = base.replace(cdir=False, cdir_threshold=1)
    assert changed.cdir is False and changed.cdir_threshold == 1.0 and isinstance(changed.cdir_threshold, float)
    assert base.cdir is True and base.replace() is base
    with pytest.raises(TypeError, match="unknown setting 'top_k'"):
        base.replace(top_k=3)


def test_unset_options_keep_the_defaults_and_the_loop_gets_them():
    assert AskSettings.from_options(seed=None, threshold_unused=None) == AskSettings()
    s = AskSettings.from_options(seed=3, top_k_docs=5, retrieval=None)
    assert (s.seed, s.top_k_docs, s.retrieval) == (3, 5, True)
    cfg = s.loop_config("guided")
    assert (cfg.top_k_docs, cfg.sampling.seed, cfg.protocol) == (5, 3, "guided")
    # LoopConfig's own defaults are AskSettings' (one owner)
    d, c = AskSettings(), LoopConfig()
    assert (c.top_k_docs, c.cdir_threshold, c.max_passes, c.guided_doc_words, c.sampling.max_tokens) == \
           (d.for_protocol(c.protocol).top_k_docs, d.cdir_threshold, d.max_passes, d.guided_doc_words, d.max_tokens)


def test_documents_per_search_default_by_protocol_and_a_set_value_wins():
    d = AskSettings()
    assert d.top_k_docs is None  # unset: the protocol that runs decides, and the record shows what it decided
    assert [d.loop_config(p).top_k_docs for p in ("native", "guided", "rag")] == [3, 1, 3]
    assert d.for_protocol("guided") == d.replace(top_k_docs=1)
    assert [d.replace(top_k_docs=5).loop_config(p).top_k_docs for p in ("native", "guided", "rag")] == [5, 5, 5]


def test_question_is_checked_once_with_its_options():
    q = Question.check("  Which code?  ", ["A. x", "y"])
    assert q.text == "Which code?" and [o.letter for o in q.options] == ["A", "B"]
    with pytest.raises(SettingError, match="cannot be combined with options") as info:
        Question.check("q", ["A. x", "B. y"], AskSettings(top_k_diagnoses=3))
    assert info.value.field == "top_k_diagnoses"


def test_the_cli_words_a_setting_by_its_flag(capsys):
    from medrwr_edge.cli import main

    assert set(FLAGS) <= {f.name for f in dataclasses.fields(AskSettings)}
    assert flag("cdir_threshold") == "--threshold" and flag("prefix_cache") == "prefix_cache"
    with pytest.raises(SystemExit) as info:
        main(["ask", "-", "q?", "--threshold", "1.5", "--no-log"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --threshold must be between 0 and 1 (got 1.5)"


def test_a_library_error_names_the_setting_and_each_front_end_words_it():
    from medrwr_edge.errors import InputError
    from medrwr_edge.runtime.backends import load_backend
    from medrwr_edge.runtime.cli_options import worded

    with pytest.raises(InputError) as info:
        load_backend("model.gguf", AskSettings(engine="http://127.0.0.1:9"))
    error = info.value
    assert str(error).startswith("engine generates with the model the server has loaded") and "--" not in str(error)
    assert worded(error).startswith("--engine generates with")
    assert error.worded(lambda name: f"setting {name!r}").startswith("setting 'engine' generates with")
    # braces in a quoted value are text, not a setting
    odd = SettingError("engine", "'{x}' is not an http(s):// URL")
    assert str(odd) == "engine '{x}' is not an http(s):// URL"
    assert worded(odd) == "--engine '{x}' is not an http(s):// URL"


def test_grpo_configs_written_with_the_old_key_still_load(tmp_path):
    from medrwr_edge.training.config import config_from_dict
    from medrwr_edge.training.grpo import GRPOConfig

    base = {"model": "m", "output_dir": str(tmp_path), "train_file": "t.jsonl"}
    assert config_from_dict({**base, "retrieval_top_k": 5}, GRPOConfig).top_k_docs == 5
    with pytest.raises(Exception, match="old name of 'top_k_docs'"):
        config_from_dict({**base, "retrieval_top_k": 5, "top_k_docs": 4}, GRPOConfig)


def test_serve_words_a_setting_by_its_json_key_and_keeps_its_own_limits():
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from medrwr_edge.runtime.api import Session
    from medrwr_edge.runtime.scripted_backend import ScriptedBackend
    from medrwr_edge.serve import ServeConfig, create_app
    from medrwr_edge.serve.worker import request_settings

    base = AskSettings()
    assert request_settings(base, None, 2048) is base
    assert request_settings(base, {"seed": 7}, 2048) == base.replace(seed=7)
    with pytest.raises(SettingError, match="max_tokens must be between 1 and 64"):
        request_settings(base, {"max_tokens": 65}, 64)
    with pytest.raises(SettingError, match="guided_read_tokens must be between 0 and 64"):
        request_settings(base, {"guided_read_tokens": 65}, 64)
    assert request_settings(base, {"guided_read_tokens": 64}, 64).guided_read_tokens == 64
    factory = lambda: Session(packs=[], image_pack=False, backend=ScriptedBackend(["<answer> A </answer>"]))  # noqa: E731
    with TestClient(create_app(factory, ServeConfig())) as client:
        for settings, message in (({"cdir_threshold": 2}, "setting 'cdir_threshold' must be between 0 and 1 (got 2.0)"),
                                  ({"top_p": 0}, "setting 'top_p' must be in (0, 1] (got 0.0)"),
                                  ({"seed": "x"}, "setting 'seed' must be an integer")):
            r = client.post("/v1/ask", data={"question": "q?", "settings": json.dumps(settings)})
            assert r.status_code == 400 and r.json()["error"]["message"] == message
