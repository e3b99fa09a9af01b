"""Round trip: train a tiny random Qwen2.5-VL on CPU → `medrwr-edge export model` → `medrwr-edge ask` answers.

The model is fine-tuned on one image question until it has learned the trace; the exported GGUF + ONNX bundle
must then produce that same trace through the edge runtime (same prompt, same pixels, same tokens), which only
holds if training and runtime agree on the chat text, the image preprocessing and the weights.
"""

from __future__ import annotations

import json
import os

import pytest

from fixtures_qwen import converter_source
from training_helpers import OPTIONS, QUESTION, TRACE, USER_TEXT, require_train_deps, tiny_vl, write_image, \
    write_jsonl, write_yaml


@pytest.mark.slow
def test_train_export_ask_round_trip(tmp_path, capsys, monkeypatch):
    require_train_deps()
    pytest.importorskip("onnx", reason="export needs the export extra: pip install -e '.[export]'")
    converter_source()  # skips when llama.cpp's converter is not cached (tests never download)
    from medrwr_edge.export import llama_cpp_src

    tree = os.environ.get("MEDRWR_LLAMA_CPP_SRC") or str(
        llama_cpp_src.cache_dir() / f"llama_cpp_python-{llama_cpp_src.LLAMA_CPP_PYTHON_VERSION}")
    monkeypatch.setenv("MEDRWR_EDGE_HOME", str(tmp_path / "home"))  # ask and export write nothing outside it
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from medrwr_edge.cli import main
    from medrwr_edge.training.modeling import collate, encode, load_model

    start = tiny_vl(tmp_path)
    image = write_image(tmp_path / "scan.png", 112, 84)
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": USER_TEXT, "response": TRACE, "image": "scan.png"}])
    cfg = write_yaml(tmp_path / "sft.yaml", {"model": str(start), "output_dir": str(tmp_path / "run"),
                                             "train_file": str(tmp_path / "sft.jsonl"), "max_steps": 30,
                                             "learning_rate": 0.01, "save_every": 15})

    # the untrained model does not produce the trace (the control)
    lm = load_model(start, for_training=False)
    enc = encode(lm, [{"role": "user", "content": USER_TEXT}], TRACE, [str(image)], max_length=4096)
    n_prompt = enc.loss_mask.index(1)
    batch = collate([enc], lm.pad_id)
    with torch.no_grad():
        out = lm.model.generate(input_ids=batch["input_ids"][:, :n_prompt],
                                attention_mask=batch["attention_mask"][:, :n_prompt],
                                pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                                max_new_tokens=20, do_sample=False)
    assert not lm.tokenizer.decode(out[0, n_prompt:]).startswith("<think> Peripheral")

    main(["train", "sft", str(cfg), "--quiet"])
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000030"
    assert capsys.readouterr().out.strip() == str(ckpt)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < 0.1 < metrics[0]["loss"]
    trained = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, use_safetensors=True)
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, lm.model.state_dict()[k])]
    assert any("language_model.layers.1" in k for k in changed) and any("visual.blocks" in k for k in changed)

    bundle = tmp_path / "bundle"
    main(["export", "model", str(ckpt), str(bundle), "--quant", "f16", "--no-parity", "--no-mmproj",
          "--no-image-encoder", "--llama-cpp-src", tree])
    capsys.readouterr()
    main(["ask", str(image), QUESTION, *[x for o in OPTIONS for x in ("-o", o)], "--model", str(bundle),
          "--no-retrieval", "--no-cdir", "--json", "--no-log"])
    record = json.loads(capsys.readouterr().out)
    assert record["model"]["has_vision"] and record["model"]["path"].startswith(str(bundle))
    assert record["assistant_text"].strip().startswith("<think> Peripheral enhancement. </think>")  # trained
    assert record["answer"] == "B" and record["letter"] == "B"
