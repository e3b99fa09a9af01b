"""`medrwr-edge doctor`: what this workstation is, what is installed and intact, and how fast an answer will be.

Measurements run on the installed model (or --model) with a fixed prompt: prompt (prefill) tokens/s, decode
tokens/s, image-encode time with the installed image encoder, and one search of the installed text pack. From
them, a *predicted seconds per answer* for a typical Med-RwR answer (formula in `predict_seconds`), which
`--check-prediction` compares with a real `ask` on the same loaded model.

The JSON output (`--json`) follows medrwr_edge/data/doctor.schema.json (schema "medrwr-edge/doctor/1").
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .. import __version__, assets
from ..errors import MedrwrError
from ..paths import cached_sha256, models_dir, packs_dir, sha256_file

SCHEMA = "medrwr-edge/doctor/1"
INTERESTING_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                     "avx512_bf16", "avx_vnni", "amx_tile", "asimd", "sve")

# The typical Med-RwR answer the prediction is for (the paper's loop at its maximum: 3 passes, 2 retrievals, then
# CDIR because the confidence came out below 0.8). Token counts are assumptions, stated here and in the output.
TYPICAL_QUESTION = ("A patient with a sudden severe headache has this head CT. Which ICD-10-CM code is nontraumatic "
                    "subarachnoid hemorrhage, unspecified?")
TYPICAL_OPTIONS = ("A. I60.9", "B. I63.9", "C. S06.6X0A", "D. G43.909")


@dataclass(frozen=True)
class Typical:
    generated_tokens: int = 200  # pass 1 think+query ~60, pass 2 think+query ~60, pass 3 think+answer ~80
    retrievals: int = 2
    docs_per_retrieval: int = 3
    tokens_per_doc: int = 120  # one ICD-10-CM entry with its notes, or a ~100-word text chunk
    cdir: bool = True
    cdir_caption_tokens: int = 40
    cdir_regenerated_tokens: int = 80  # the answering pass, generated again after the CDIR splice


TYPICAL = Typical()
BENCH_PROMPT_TOKENS = 128
BENCH_DECODE_TOKENS = 32
_BENCH_TEXT = ("The chest radiograph shows a right lower lobe consolidation with air bronchograms and a small "
               "parapneumonic effusion; the differential includes bacterial pneumonia, aspiration and atelectasis. ")


# ------------------------------------------------------------------------------------------------ the machine


def cpu_info() -> dict:
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("flags", "features") and not flags:
                flags = set(value.split())
            elif key in ("model name", "hardware") and value.strip():
                model = value.strip()
    except OSError:
        pass  # not Linux: the llama.cpp system line below still says what the build uses
    from ..runtime import llama_native

    from .. import cpu

    threads = cpu.describe()
    return {
        "model": model,
        "architecture": platform.machine(),
        "physical_cores": threads["physical_cores_total"],
        "logical_cores": os.cpu_count() or 1,
        "usable_cores": threads["allowed_cpus"],
        "default_threads": threads["threads"],
        "cgroup_cpu_limit": threads["cgroup_cpu_limit"],
        "flags": {f: f in flags for f in INTERESTING_FLAGS},
        "llama_cpp_system_info": llama_native.system_info().strip(),
    }


def memory_info() -> dict:
    values = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    total = values.get("MemTotal")
    if total is None and hasattr(os, "sysconf"):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            total = None
    return {"total_bytes": total, "available_bytes": values.get("MemAvailable")}


def parse_nvidia_smi(csv_text: str) -> list[dict]:
    """Rows of `nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader,nounits`."""
    gpus = []
    for line in csv_text.splitlines():
        parts = [p.strip() for p in line.rsplit(",", 2)]  # a GPU name could contain a comma; the numbers cannot
        if len(parts) == 3 and parts[1].isdigit():
            gpus.append({"name": parts[0], "memory_total_mib": int(parts[1]),
                         "memory_used_mib": int(parts[2]) if parts[2].isdigit() else None})
    return gpus


def gpu_info() -> dict:
    from ..runtime import llama_native

    nvidia = []
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
            nvidia = parse_nvidia_smi(out.stdout)
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import onnxruntime

        providers = list(onnxruntime.get_available_providers())
    except ImportError:
        providers = []
    return {"llama_cpp_gpu_offload": llama_native.supports_gpu_offload(), "nvidia": nvidia,
            "onnxruntime_providers": providers}


# ------------------------------------------------------------------------------------------------ installed


def _model_status(folder: Path, full: bool) -> str:
    """"ok" when every file matches installed.json (cached sha256 unless full), else what is wrong."""
    try:
        record = json.loads((folder / assets.INSTALLED_JSON).read_text("utf-8"))
        for rel, info in record["files"].items():
            path = folder / rel
            if not path.is_file():
                return f"failed: {rel} is missing"
            if path.stat().st_size != info["size"]:
                return f"failed: {rel} has the wrong size"
            if (sha256_file(path) if full else cached_sha256(path)) != info["sha256"]:
                return f"failed: {rel} does not match its sha256"
        art = assets.REGISTRY.get(folder.name)
        if art is not None and art.sha256 and record.get("sha256") != art.sha256:
            return "failed: not the registry's file"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"failed: unreadable installed.json ({type(e).__name__})"
    return "ok"


def installed_models(full: bool = False) -> list[dict]:
    out = []
    names = list(assets.REGISTRY)
    if models_dir().is_dir():
        names += sorted(p.name for p in models_dir().iterdir() if p.is_dir() and p.name not in assets.REGISTRY)
    for name in names:
        folder = models_dir() / name
        art = assets.REGISTRY.get(name)
        installed = (folder / assets.INSTALLED_JSON).is_file() or (folder / "manifest.json").is_file()
        entry = {"name": name, "kind": art.kind if art else "custom", "installed": installed,
                 "size_bytes": None, "verified": None}
        if installed:
            entry["size_bytes"] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            if (folder / assets.INSTALLED_JSON).is_file():
                entry["verified"] = _model_status(folder, full)
            else:
                from ..export import bundle as model_bundle

                try:
                    model_bundle.verify_bundle(folder) if full else model_bundle.read_manifest(folder)
                    entry["verified"] = "ok" if full else "manifest ok"
                    entry["kind"] = "model-bundle"
                except MedrwrError as e:
                    entry["verified"] = f"failed: {e}"
        out.append(entry)
    return out


def installed_packs(full: bool = False) -> list[dict]:
    from ..kb_pack.pack import Pack

    out = []
    if not packs_dir().is_dir():
        return out
    for folder in sorted(p for p in packs_dir().iterdir() if p.is_dir() and not p.name.startswith(".")):
        entry = {"name": folder.name, "version": None, "kind": None, "doc_count": None, "verified": None}
        try:
            with Pack.open(folder, verify="full" if full else "fast") as pack:
                entry.update(version=pack.version, kind=pack.kind, doc_count=pack.doc_count)
                problems = pack.verify() if full else []
            entry["verified"] = f"failed: {problems[0]}" if problems else ("ok" if full else "sizes ok")
        except MedrwrError as e:
            entry["verified"] = f"failed: {e}"
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------------------ measuring


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_llm(model_path: Path, n_threads: Optional[int] = None, prompt_tokens: int = BENCH_PROMPT_TOKENS,
                decode_tokens: int = BENCH_DECODE_TOKENS) -> dict:
    """Prefill and greedy decode speed on a fixed prompt (one warm-up pass first, then one measured pass)."""
    from ..runtime import llama_native, protocol

    t0 = time.perf_counter()
    model = llama_native.NativeModel(model_path)
    threads = n_threads or llama_native.physical_cores()
    ctx = llama_native.NativeContext(model, n_ctx=prompt_tokens + decode_tokens + 64, n_batch=512,
                                     n_threads=threads)
    load_s = time.perf_counter() - t0
    try:
        tokens = model.tokenize(_BENCH_TEXT * (1 + 2 * prompt_tokens // 20), add_special=False)[:prompt_tokens]

        def run() -> tuple[float, float]:
            ctx.clear()
            t_start = time.perf_counter()
            ctx.decode_tokens(tokens, 0)
            t_prefill = time.perf_counter() - t_start
            pos, t_start = len(tokens), time.perf_counter()
            for _ in range(decode_tokens):  # greedy: argmax of the last logits, EOG or not (speed only)
                ctx.decode_one(int(np.argmax(ctx.last_logits())), pos)
                pos += 1
            return t_prefill, time.perf_counter() - t_start

        run()  # warm-up: first-touch of the weights, thread pool start
        t_prefill, t_decode = run()
        real_prompt = protocol.prompt_text(protocol.chatml_prompt(
            protocol.system_prompt(has_image=False),
            protocol.user_text(TYPICAL_QUESTION, protocol.parse_options(TYPICAL_OPTIONS))))
        splice = protocol.retrieve_block(["x"] * TYPICAL.docs_per_retrieval)
        cdir = protocol.cdir_block("x")
        count = lambda text: len(model.tokenize(text, add_special=False, parse_special=True))  # noqa: E731
        facts = {
            "prompt_tokens_real": count(real_prompt) + (1 if model.facts.add_bos else 0),
            # the block templates with one-token placeholders; the typical document/caption lengths are added
            "retrieve_template_tokens": count(splice) - TYPICAL.docs_per_retrieval,
            "cdir_template_tokens": count(cdir) - 1,
        }
    finally:
        ctx.close()
        model.close()
    return {
        "model": Path(model_path).name,
        "model_path": str(Path(model_path).resolve()),
        "threads": threads,
        "load_s": round(load_s, 3),
        "bench_prompt_tokens": len(tokens),
        "prompt_tokens_per_s": round(len(tokens) / t_prefill, 2),
        "bench_decode_tokens": decode_tokens,
        "decode_tokens_per_s": round(decode_tokens / t_decode, 2),
        **facts,
    }


def measure_image_encode(encoder_dir: Optional[Path] = None, repeats: int = 3) -> Optional[float]:
    """Milliseconds to embed one 512x512 image with the installed image encoder; None when none is installed."""
    from ..kb_pack.encoders import load_encoder

    try:
        encoder_dir = encoder_dir or assets.default_image_encoder_dir()
    except MedrwrError:
        return None
    encoder = load_encoder(encoder_dir, prefer_gpu=False)
    yy, xx = np.mgrid[0:512, 0:512]
    image = np.stack([(xx // 2) % 256, (yy // 2) % 256, ((xx + yy) // 4) % 256], axis=-1).astype(np.uint8)
    encoder.embed([image])  # warm-up
    return round(_median_seconds(lambda: encoder.embed([image]), repeats) * 1000, 2)


def measure_search(pack: Optional[str] = None, repeats: int = 3) -> Optional[dict]:
    """Seconds for one hybrid search (query embedding included) of the installed default text pack, or `pack`."""
    from ..kb_pack.pack import Pack, resolve_pack_path
    from ..kb_pack.opening import DEFAULT_TEXT_PACK

    path = resolve_pack_path(pack or DEFAULT_TEXT_PACK)
    if not path.is_dir():
        return None
    with Pack.open(path) as p:
        query = "nontraumatic subarachnoid hemorrhage"
        p.search(query, k=3)  # warm-up: loads the encoder
        seconds = _median_seconds(lambda: p.search(query, k=3), repeats)
        return {"pack": p.name, "doc_count": p.doc_count, "search_ms": round(seconds * 1000, 2)}


# ------------------------------------------------------------------------------------------------ predicting


def predict_seconds(llm: dict, image_encode_ms: Optional[float], search_ms: Optional[float],
                    typical: Typical = TYPICAL) -> dict:
    """Seconds for one typical answer with the model already loaded (what `ask` reports as its total):

        prompt    = real system+user prompt tokens / prompt_tok_s
        generate  = typical generated tokens / decode_tok_s
        splices   = retrievals x (docs x tokens_per_doc + retrieve template) / prompt_tok_s
        cdir      = (caption + CDIR template) / prompt_tok_s + regenerated tokens / decode_tok_s
        search    = retrievals x search_s + image_encode_s (the query image, once, for CDIR)
        predicted = prompt + generate + splices + cdir + search
    """
    pp, tg = llm["prompt_tokens_per_s"], llm["decode_tokens_per_s"]
    splice_tokens = typical.docs_per_retrieval * typical.tokens_per_doc + llm["retrieve_template_tokens"]
    terms = {
        "prompt": llm["prompt_tokens_real"] / pp,
        "generate": typical.generated_tokens / tg,
        "retrieval_splices": typical.retrievals * splice_tokens / pp,
        "cdir": ((typical.cdir_caption_tokens + llm["cdir_template_tokens"]) / pp
                 + typical.cdir_regenerated_tokens / tg) if typical.cdir else 0.0,
        "search_and_encode": typical.retrievals * (search_ms or 0.0) / 1000
                             + ((image_encode_ms or 0.0) / 1000 if typical.cdir else 0.0),
    }
    return {
        "seconds_per_answer": round(sum(terms.values()), 3),
        "terms_s": {k: round(v, 3) for k, v in terms.items()},
        "assumptions": {**vars(typical), "prompt_tokens_real": llm["prompt_tokens_real"],
                        "retrieve_template_tokens": llm["retrieve_template_tokens"],
                        "cdir_template_tokens": llm["cdir_template_tokens"],
                        "search_ms": search_ms, "image_encode_ms": image_encode_ms},
        "formula": ("prompt_tokens/pp + generated/tg + retrievals*(docs*tokens_per_doc + template)/pp"
                    " + (cdir caption + template)/pp + cdir regenerated/tg + retrievals*search + image_encode"),
    }


def predict_for_counts(llm: dict, tokens: dict, n_retrievals: int, cdir: bool, image_encode_ms: Optional[float],
                       search_ms: Optional[float]) -> float:
    """The same throughput model applied to a real run's own token counts (checks the rates, not the guesses)."""
    prefilled = tokens.get("prompt", 0) + tokens.get("inserted", 0)
    return (prefilled / llm["prompt_tokens_per_s"] + tokens.get("generated", 0) / llm["decode_tokens_per_s"]
            + n_retrievals * (search_ms or 0.0) / 1000 + ((image_encode_ms or 0.0) / 1000 if cdir else 0.0))


def check_prediction(model_path: Path, llm: dict, prediction: dict, image_encode_ms: Optional[float],
                     search_ms: Optional[float], packs: Optional[list[str]] = None, max_tokens: Optional[int] = None,
                     n_threads: Optional[int] = None) -> dict:
    """Run one real `ask` (the typical question, greedy) and compare its time with both predictions."""
    from ..kb_pack.opening import DEFAULT_TEXT_PACK
    from ..runtime.api import AskSettings, Session

    use_packs = packs if packs else ([DEFAULT_TEXT_PACK] if (packs_dir() / DEFAULT_TEXT_PACK).is_dir() else [])
    settings = AskSettings.from_options(max_tokens=max_tokens, n_threads=n_threads or llm["threads"],
                                        retrieval=bool(use_packs), prefix_cache=False)
    with Session(packs=use_packs, image_pack=False, model=model_path, settings=settings) as session:
        record = session.ask(None, TYPICAL_QUESTION, list(TYPICAL_OPTIONS))
    actual = float(record.timings["total"])
    n_ret = len(record.retrievals())
    has_cdir = record.cdir() is not None
    same = predict_for_counts(llm, record.tokens, n_ret, has_cdir, image_encode_ms, search_ms)
    typical = prediction["seconds_per_answer"]
    return {
        "actual_s": round(actual, 3),
        "tokens": {k: record.tokens.get(k, 0) for k in ("prompt", "generated", "inserted")},
        "retrievals": n_ret,
        "cdir": has_cdir,
        "packs": [p["name"] for p in record.packs],
        "predicted_same_counts_s": round(same, 3),
        "relative_error_same_counts": round((same - actual) / actual, 4) if actual > 0 else None,
        "predicted_typical_s": typical,
        "relative_error_typical": round((typical - actual) / actual, 4) if actual > 0 else None,
    }


# ------------------------------------------------------------------------------------------------ report


def _default_model() -> Optional[Path]:
    for name in (assets.QWEN_1_5B, assets.QWEN_0_5B, assets.SMOLLM2):
        if assets.is_installed(name):
            return assets.installed_path(name)
    return None


def resolve_model(model: Optional[str]) -> Optional[Path]:
    if model is None:
        return _default_model()
    path = Path(model)
    if not path.exists() and os.sep not in model:
        return assets.installed_path(model)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise MedrwrError(f"{path} must hold exactly one .gguf file for doctor to measure")
        path = ggufs[0]
    assets.check_gguf(path)
    return path


def run_doctor(model: Optional[str] = None, full: bool = False, measure: bool = True, check: bool = False,
               packs: Optional[list[str]] = None, n_threads: Optional[int] = None, max_tokens: Optional[int] = None,
               quick: bool = False) -> dict:
    """The whole report as a dict (schema medrwr-edge/doctor/1). quick: a 32-token prompt and 8 decoded tokens
    instead of 128 and 32 (less precise, for tests and very slow machines)."""
    report: dict = {
        "schema": SCHEMA,
        "medrwr_edge_version": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": cpu_info(),
        "memory": memory_info(),
        "gpu": gpu_info(),
        "models": installed_models(full),
        "packs": installed_packs(full),
        "measurements": None,
        "prediction": None,
        "check": None,
        "notes": [],
    }
    if not measure:
        return report
    model_path = resolve_model(model)
    if model_path is None:
        report["notes"].append("no LLM installed: nothing measured (medrwr-edge models install --default)")
        return report
    llm = measure_llm(model_path, n_threads, *((32, 8) if quick else (BENCH_PROMPT_TOKENS, BENCH_DECODE_TOKENS)))
    image_ms = measure_image_encode()
    if image_ms is None:
        report["notes"].append("no image encoder installed: image-encode time not measured (CDIR costs unknown)")
    search = measure_search(packs[0] if packs else None)
    if search is None:
        report["notes"].append("no text pack installed: search time not measured (counted as 0)")
    report["measurements"] = {"llm": llm, "image_encode_ms": image_ms, "search": search}
    report["prediction"] = predict_seconds(llm, image_ms, search["search_ms"] if search else None)
    if check:
        report["check"] = check_prediction(model_path, llm, report["prediction"], image_ms,
                                           search["search_ms"] if search else None, packs, max_tokens, n_threads)
    if (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0) > report["cpu"]["usable_cores"]:
        report["notes"].append(f"load average {os.getloadavg()[0]:.1f} exceeds the cores: the machine is busy, "
                               "so the measured speeds (and the prediction) are pessimistic")
    return report


def format_report(r: dict) -> str:
    c, m, g = r["cpu"], r["memory"], r["gpu"]
    gib = lambda b: f"{b / 2**30:.1f} GiB" if b else "?"  # noqa: E731
    flags = " ".join(f for f, on in c["flags"].items() if on) or "none of note"
    lines = [
        f"medrwr-edge {r['medrwr_edge_version']} · Python {r['python']} · {r['platform']}",
        f"CPU: {c['model']} · {c['physical_cores']} physical / {c['logical_cores']} logical cores "
        f"({c['usable_cores']} usable)",
        f"  threads by default: {c['default_threads']} (physical cores within the CPU affinity"
        + (f", cgroup limit {c['cgroup_cpu_limit']:g} CPUs" if c.get("cgroup_cpu_limit") else "")
        + "; llama.cpp and ONNX alike, --threads overrides)",
        f"  flags: {flags}" + ("" if c["flags"].get("avx2") or c["flags"].get("asimd")
                               else "  (no AVX2: llama.cpp and hnswlib run their slow paths)"),
        f"RAM: {gib(m['total_bytes'])} total, {gib(m['available_bytes'])} available",
        "GPU: " + (", ".join(f"{d['name']} ({d['memory_total_mib']} MiB)" for d in g["nvidia"]) or "none found")
        + f" · llama.cpp GPU offload: {'yes' if g['llama_cpp_gpu_offload'] else 'no (CPU build)'}"
        + f" · onnxruntime: {', '.join(g['onnxruntime_providers']) or '-'}",
        "models:",
    ]
    for e in r["models"]:
        if e["installed"]:
            lines.append(f"  {e['name']:<38} {e['kind']:<14} {e['size_bytes'] / 1e6:>9,.1f} MB  {e['verified']}")
    if not any(e["installed"] for e in r["models"]):
        lines.append("  none installed (medrwr-edge setup)")
    lines.append("packs:" if r["packs"] else "packs: none installed")
    for e in r["packs"]:
        lines.append(f"  {e['name']:<38} {e['kind'] or '?':<6} {e['doc_count'] or 0:>7} docs  {e['verified']}")
    meas = r["measurements"]
    if meas:
        llm = meas["llm"]
        lines += [
            f"speed ({llm['model']}, {llm['threads']} threads): prompt {llm['prompt_tokens_per_s']:.1f} tok/s · "
            f"decode {llm['decode_tokens_per_s']:.1f} tok/s · load {llm['load_s']:.2f} s",
            "  image encode: " + (f"{meas['image_encode_ms']:.0f} ms" if meas["image_encode_ms"] is not None else "-")
            + " · search: " + (f"{meas['search']['search_ms']:.0f} ms ({meas['search']['pack']})"
                               if meas["search"] else "-"),
        ]
        p = r["prediction"]
        terms = ", ".join(f"{k} {v:.1f}" for k, v in p["terms_s"].items())
        lines.append(f"predicted: {p['seconds_per_answer']:.1f} s per typical answer "
                     f"(2 retrievals + CDIR, {TYPICAL.generated_tokens}+{TYPICAL.cdir_regenerated_tokens} tokens "
                     f"generated; {terms})")
    chk = r["check"]
    if chk:
        lines.append(
            f"check: a real ask took {chk['actual_s']:.2f} s ({chk['retrievals']} retrieval(s), "
            f"{'CDIR' if chk['cdir'] else 'no CDIR'}, {chk['tokens']['generated']} tokens generated); "
            f"predicted for those counts {chk['predicted_same_counts_s']:.2f} s "
            f"(error {100 * chk['relative_error_same_counts']:+.0f}%), typical prediction "
            f"{chk['predicted_typical_s']:.2f} s (error {100 * chk['relative_error_typical']:+.0f}% vs this run)")
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)
