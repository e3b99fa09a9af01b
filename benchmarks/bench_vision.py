"""Vision encoder speed: ONNX fp32 and int8 vs torch eager, and image+text prefill ONNX-embeds path vs mtmd.

    python benchmarks/bench_vision.py [--depth 4] [--size 512] [--reps 3]

A Qwen2.5-VL vision tower at the 7B model's full width (1280 wide, 16 heads, MLP 3420, merger to the decoder
width) with random weights (the trained weights are not installable here) and `--depth` blocks (the 7B has 32;
time scales linearly with depth, the ratios do not change), on a real image resized to Med-RwR's pixel budget
(512x512 -> 1296 patches -> 324 image tokens). All timings in one run, same threads for torch and ORT.

Part 2 exports the same checkpoint (tiny 64-wide decoder) to a bundle and times the prefill of one image + a
question through (a) `QwenVLBackend` (ORT vision -> llama.cpp embeddings batch with M-RoPE positions) and (b)
llama-cpp-python's `Qwen25VLChatHandler` (mtmd: ggml CLIP from the mmproj GGUF), each followed by one token.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from fixtures_qwen import make_tiny_qwen25vl  # noqa: E402


def timeit(fn, reps: int) -> float:
    fn()  # warm-up (ORT arena, torch allocator)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--size", type=int, default=512, help="image side in pixels before smart_resize")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-prefill", action="store_true")
    args = ap.parse_args()

    import torch

    from medrwr_edge.export import qwen_vision as QV
    from medrwr_edge.export.qwen import check_checkpoint, load_vision_tower, sample_images
    from medrwr_edge.runtime.llama_native import physical_cores
    from medrwr_edge.runtime.vision import VisionEncoder, VisionSpec, preprocess

    threads = physical_cores()
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="bench-vision-"))
    ckpt = make_tiny_qwen25vl(work / "ckpt", vision_hidden=1280, vision_depth=args.depth, vision_heads=16,
                              vision_intermediate=3420, fullatt_block_indexes=[args.depth - 1],
                              initializer_range=0.02)
    ck = check_checkpoint(ckpt)
    spec = VisionSpec.from_hf(ck.config, ck.preprocessor)
    tower = load_vision_tower(ck)
    holder = type("H", (), {"visual": tower})()
    from PIL import Image

    image = np.asarray(Image.fromarray(sample_images()[0]).resize((args.size, args.size), Image.BICUBIC))
    patches, grid = preprocess(image, spec)
    fp32 = QV.export_vision_onnx(holder, spec, work / "vision.onnx", image)
    int8 = QV.quantize_int8(fp32, work / "vision-int8.onnx")
    enc32, enc8 = VisionEncoder(fp32, spec, threads), VisionEncoder(int8, spec, threads)

    grid_t = torch.tensor([list(grid)])
    pv = torch.from_numpy(patches)

    def run_torch():
        with torch.no_grad():
            return tower(pv, grid_thw=grid_t)

    t_torch = timeit(run_torch, args.reps)
    t_fp32 = timeit(lambda: enc32.encode(image), args.reps)
    t_int8 = timeit(lambda: enc8.encode(image), args.reps)
    ref = run_torch().float().numpy()
    cos32 = QV.cosine_rows(enc32.encode(image)[0], ref)
    cos8 = QV.cosine_rows(enc8.encode(image)[0], ref)
    print(f"vision tower 1280 wide x {args.depth} blocks, {patches.shape[0]} patches -> {patches.shape[0] // 4} "
          f"tokens, {threads} threads, median of {args.reps}")
    print(f"  torch eager fp32   {t_torch * 1000:8.0f} ms   1.00x")
    print(f"  ONNX fp32          {t_fp32 * 1000:8.0f} ms   {t_torch / t_fp32:.2f}x   min token cosine {cos32:.5f}")
    print(f"  ONNX int8 dynamic  {t_int8 * 1000:8.0f} ms   {t_torch / t_int8:.2f}x   min token cosine {cos8:.5f}")
    print("  (ONNX times include numpy preprocessing + rotary/window inputs; torch gets pre-made patches)")
    if args.skip_prefill:
        return

    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Qwen25VLChatHandler

    from medrwr_edge.export.qwen import export_model
    from medrwr_edge.runtime.backend import ImageInput, SamplingSettings
    from medrwr_edge.runtime.multimodal_backend import load_bundle

    bundle = export_model(ckpt, work / "bundle", quant="f32", mmproj=True, parity=False)
    question = "What does the study show?"
    be = load_bundle(bundle, n_ctx=2048, prefer_int8=False)

    def onnx_path():
        be.reset()
        be.prefill(["<|im_start|>user\n<|vision_start|>", ImageInput(image, ""),
                    f"<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"])
        be.generate(SamplingSettings(max_tokens=1), stop=[])

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    import json

    m = json.loads((bundle / "manifest.json").read_text())
    llm = Llama(str(bundle / m["text_model"]), chat_handler=Qwen25VLChatHandler(
        clip_model_path=str(bundle / m["mmproj"]), verbose=False), n_ctx=2048, n_threads=threads, verbose=False)

    def mtmd_path():
        llm.reset()
        llm.create_chat_completion(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": question}]}],
            max_tokens=1, temperature=0)

    t_onnx = timeit(onnx_path, args.reps)
    t_mtmd = timeit(mtmd_path, args.reps)
    print(f"image + question prefill + 1 token ({m['mmproj']} vs vision.onnx fp32, decoder 64 wide)")
    print(f"  mtmd (mmproj GGUF)       {t_mtmd * 1000:8.0f} ms   1.00x")
    print(f"  ONNX embeds -> llama.cpp {t_onnx * 1000:8.0f} ms   {t_mtmd / t_onnx:.2f}x")
    be.close()


if __name__ == "__main__":
    main()
