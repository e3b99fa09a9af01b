"""SFT and DPO: the runtime's prompts, assistant-only loss masks, the DPO loss, and short real training runs."""

from __future__ import annotations

import json
import math

import pytest

from training_helpers import (
    OPTIONS,
    QUESTION,
    TRACE,
    USER_TEXT,
    require_train_deps,
    sft_rows,
    tiny_causal_lm,
    tiny_vl,
    write_image,
    write_jsonl,
    write_yaml,
)

from medrwr_edge.errors import InputError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    require_train_deps()
    return tmp_path_factory.mktemp("train-sft-dpo")


@pytest.fixture(scope="module")
def vl(root):
    return tiny_vl(root)


@pytest.fixture(scope="module")
def vl_loaded(vl):
    from medrwr_edge.training.modeling import load_model

    return load_model(vl)


@pytest.fixture(scope="module")
def text_lm(root):
    return tiny_causal_lm(root / "tiny-qwen2")


@pytest.fixture(scope="module")
def image(root):
    return write_image(root / "img.png")


# ------------------------------------------------------------------------------------------------ prompts and masks


def test_training_prompt_is_the_runtime_prompt_byte_for_byte(vl_loaded):
    from medrwr_edge.runtime import protocol
    from medrwr_edge.runtime.backend import ImageInput
    from medrwr_edge.training.modeling import prompt_text

    user = protocol.user_text(QUESTION, protocol.parse_options(OPTIONS))
    assert user == USER_TEXT
    for vision, images in ((True, [ImageInput(None, "0" * 64)]), (False, [])):
        runtime = protocol.prompt_text(protocol.chatml_prompt(protocol.system_prompt(bool(images)), user, images,
                                                              vision=vision))
        assert prompt_text([{"role": "user", "content": USER_TEXT}], len(images), vision) == runtime
    assert prompt_text([{"role": "user", "content": "q"}], 0, False).startswith(
        "<|im_start|>system\n" + protocol.SYSTEM_PROMPT_TEXT + "<|im_end|>\n<|im_start|>user\nq<|im_end|>\n")


def test_sft_loss_mask_covers_only_the_assistant_reply_minus_retrieved_text(vl_loaded, image):
    from medrwr_edge.runtime.vision import n_image_tokens
    from medrwr_edge.training.modeling import encode, prompt_text

    tok = vl_loaded.tokenizer
    reply = ("<think> Opacity. </think>\n<query> lobar pneumonia </query>\n<retrieve> (1) J18.1 Lobar pneumonia\n "
             "</retrieve>\n<answer> B </answer>")
    enc = encode(vl_loaded, [{"role": "user", "content": USER_TEXT}], reply, [str(image)], max_length=4096)
    first = enc.loss_mask.index(1)
    prompt = tok.decode(enc.input_ids[:first])
    grid = tuple(enc.image_grid_thw[0].tolist())
    n_pad = n_image_tokens(grid, vl_loaded.vision_spec)
    assert prompt == prompt_text([{"role": "user", "content": USER_TEXT}], 1, True).replace(
        "<|image_pad|>", "<|image_pad|>" * n_pad)
    assert enc.input_ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == n_pad
    assert enc.pixel_values.shape[0] == grid[0] * grid[1] * grid[2]
    trained = tok.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if m])
    assert trained == ("<think> Opacity. </think>\n<query> lobar pneumonia </query>\n<answer> B </answer>"
                       "<|im_end|>")
    assert tok.decode(enc.input_ids[first:]) == reply + "<|im_end|>"
    assert sum(enc.loss_mask[:first]) == 0
    unmasked = encode(vl_loaded, [{"role": "user", "content": USER_TEXT}], reply, [str(image)], max_length=4096,
                      mask_retrieved=False)
    assert tok.decode([t for t, m in zip(unmasked.input_ids, unmasked.loss_mask) if m]) == reply + "<|im_end|>"


def test_multi_turn_rows_train_only_the_last_reply(text_lm):
    from medrwr_edge.training.modeling import encode, load_model

    lm = load_model(text_lm)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "earlier reply"}, {"role": "user", "content": "second"}]
    enc = encode(lm, messages, "last reply", [], max_length=512)
    text = lm.tokenizer.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nfirst<|im_end|>\n"
                           "<|im_start|>assistant\nearlier reply<|im_end|>\n")
    assert lm.tokenizer.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if m]) == "last reply<|im_end|>"
    assert enc.pixel_values is None


def test_sft_loss_equals_cross_entropy_with_ignored_labels(vl_loaded, image):
    import torch

    from medrwr_edge.training.modeling import collate, encode
    from medrwr_edge.training.sft import sft_loss

    rows = [encode(vl_loaded, [{"role": "user", "content": USER_TEXT}], TRACE, [str(image)], max_length=4096),
            encode(vl_loaded, [{"role": "user", "content": "short"}], "<answer> A </answer>", [], max_length=4096)]
    batch = collate(rows, vl_loaded.pad_id)
    model = vl_loaded.model.eval()
    with torch.no_grad():
        ours, n = sft_loss(model, batch)
        labels = batch["input_ids"].masked_fill(batch["loss_mask"] == 0, -100)
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"], labels=labels).loss
    model.train()
    assert n == sum(r.response_tokens for r in rows)
    assert float(ours) == pytest.approx(float(hf), rel=1e-5)


def test_truncating_into_an_image_is_refused(vl_loaded, image):
    from medrwr_edge.training.modeling import encode

    with pytest.raises(InputError, match="max_length 40"):
        encode(vl_loaded, [{"role": "user", "content": USER_TEXT}], TRACE, [str(image)], max_length=40)


# ------------------------------------------------------------------------------------------------ DPO


def test_dpo_loss_matches_a_hand_computed_example():
    import torch

    from medrwr_edge.training.dpo import dpo_loss

    pc, pr = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0])
    rc, rr = torch.tensor([-2.0, -4.0]), torch.tensor([-2.0, -2.0])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # pair 1: 0.5 * ((-1 + 2) - (-3 + 2)) = 1.0 -> -log sigmoid(1) = log(1 + e^-1)
    assert float(loss[0]) == pytest.approx(math.log(1 + math.exp(-1.0)), abs=1e-6)
    # pair 2: policy = reference -> margin 0 -> log 2
    assert float(loss[1]) == pytest.approx(math.log(2.0), abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.5, 0.0]) and rejected.tolist() == pytest.approx([-0.5, 0.0])


def test_dpo_training_prefers_the_chosen_reply(tmp_path, vl, image):
    from medrwr_edge.training.config import DPOConfig
    from medrwr_edge.training.dpo import train_dpo

    data = write_jsonl(tmp_path / "dpo.jsonl", [
        {"prompt": USER_TEXT, "chosen": TRACE, "rejected": "<answer> A </answer>", "image": str(image)},
        {"prompt": "Chest film: lobar opacity. A. effusion B. pneumonia", "chosen": "<answer> B </answer>",
         "rejected": "<think> unsure </think>\n<answer> A </answer>"},
    ])
    config = DPOConfig(model=str(vl), output_dir=str(tmp_path / "dpo"), train_file=str(data), max_steps=2,
                       batch_size=2, learning_rate=3e-3, beta=0.5)
    ckpt = train_dpo(config, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference at the first step
    assert rows[0]["reward_margin"] == pytest.approx(0, abs=1e-4)
    assert rows[1]["loss"] < rows[0]["loss"] and rows[1]["reward_margin"] > 0 and rows[1]["accuracy"] == 1.0
    assert ckpt.name == "step-0000002" and (ckpt / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ SFT runs


def test_sft_run_lowers_the_loss_and_resumes(tmp_path, text_lm, capsys):
    import torch

    from medrwr_edge.cli import main
    from medrwr_edge.training.modeling import load_model

    write_jsonl(tmp_path / "sft.jsonl", sft_rows(image_name="img.png"))
    write_image(tmp_path / "img.png")
    cfg = write_yaml(tmp_path / "sft.yaml", {"model": str(text_lm), "output_dir": str(tmp_path / "out"),
                                             "train_file": str(tmp_path / "sft.jsonl"), "max_steps": 4,
                                             "batch_size": 2, "learning_rate": 0.01, "save_every": 2})
    main(["train", "sft", str(cfg), "--quiet", "--max-steps", "2"])
    assert capsys.readouterr().out.strip().endswith("step-0000002")
    main(["train", "sft", str(cfg), "--quiet"])  # resumes at 2, runs to 4
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[0]["response_tokens"] > 0 and rows[0]["tokens"] > rows[0]["response_tokens"]
    start, trained = load_model(text_lm).model.state_dict(), load_model(tmp_path / "out/checkpoints/step-0000004")
    assert not torch.equal(start["model.layers.0.mlp.up_proj.weight"],
                           trained.model.state_dict()["model.layers.0.mlp.up_proj.weight"])


def test_bad_training_rows_are_one_error_line_with_file_and_line(tmp_path, text_lm, capsys):
    from medrwr_edge.cli import main

    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "p"}])
    cfg = write_yaml(tmp_path / "c.yaml", {"model": str(text_lm), "output_dir": str(tmp_path / "o"),
                                           "train_file": str(tmp_path / "sft.jsonl")})
    with pytest.raises(SystemExit):
        main(["train", "sft", str(cfg)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sft.jsonl:2: missing 'response'" in err
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_not_a_checkpoint_dir_is_one_error_line(tmp_path, capsys):
    from medrwr_edge.cli import main

    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "response": "r"}])
    cfg = write_yaml(tmp_path / "c.yaml", {"model": "Qwen/Qwen2.5-VL-7B-Instruct", "output_dir": str(tmp_path / "o"),
                                           "train_file": str(tmp_path / "sft.jsonl")})
    with pytest.raises(SystemExit):
        main(["train", "sft", str(cfg)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "local Hugging Face checkpoint directory" in err


def test_a_row_whose_prompt_fills_max_length_is_named(tmp_path, text_lm, capsys):
    from medrwr_edge.cli import main

    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "long " * 400, "response": "r"}])
    cfg = write_yaml(tmp_path / "c.yaml", {"model": str(text_lm), "output_dir": str(tmp_path / "o"),
                                           "train_file": str(tmp_path / "sft.jsonl"), "max_length": 600,
                                           "batch_size": 2, "max_steps": 1})
    with pytest.raises(SystemExit):
        main(["train", "sft", str(cfg), "--quiet"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sft.jsonl:2: max_length 600 cuts off the whole response" in errors[0]
    assert "Traceback" not in err
