"""The command line's options for `AskSettings` fields: one definition per flag, shared by ask, chat, eval, serve.

Every option defaults to None ("unset") and every switch to off: a command hands what its user set to
`AskSettings.from_options`, so the defaults live in AskSettings alone (--help shows them from there). `FLAGS` is
the command line's word for each field; `worded` uses it to word a library error (medrwr_edge/cli.py, chat).

Imports typer and the settings module only, so that `medrwr-edge --help` stays fast.
"""

from __future__ import annotations

import typer

from .settings import AskSettings

FLAGS = {
    "temperature": "--temperature", "seed": "--seed", "max_tokens": "--max-tokens", "cdir_threshold": "--threshold",
    "search_mode": "--mode", "top_k_docs": "--top-k-docs", "n_ctx": "--ctx", "gpu_layers": "--gpu-layers",
    "n_threads": "--threads",
    "speculative": "--speculative", "frame": "--frame", "top_k_diagnoses": "--top-k-diagnoses",
    "protocol": "--protocol", "engine": "--engine", "engine_timeout": "--engine-timeout",
    "guided_think_tokens": "--think-tokens", "guided_read_tokens": "--read-tokens",
    "guided_doc_words": "--doc-words", "guided_excerpt": "--excerpt",
    # switches: the flag that turns the default over
    "retrieval": "--no-retrieval", "cdir": "--no-cdir", "cdir_open_ended": "--cdir-open-ended",
    "allow_mixed_modalities": "--allow-mixed-modalities", "guided_exemplar": "--no-exemplar",
}


# The command line's word for the other names a library error may use: arguments of the API (runtime/api.py,
# evidence/log.py) that commands take as options.
ARGUMENT_FLAGS = {"packs": "--pack", "image_pack": "--image-pack", "model": "--model", "no_log": "--no-log"}


def flag(field: str) -> str:
    """The command line's name for an AskSettings field or API argument (the name itself when no flag sets it)."""
    return FLAGS.get(field) or ARGUMENT_FLAGS.get(field, field)


def worded(error) -> str:
    """A library error (`MedrwrError`) in the command line's words: each setting it names by its flag."""
    return error.worded(flag)


def _option(field: str, help: str):
    default = getattr(AskSettings, field)
    return typer.Option(None, FLAGS[field], help=help, show_default=str(default) if default is not None else False)


def _switch(field: str, help: str):
    return typer.Option(False, FLAGS[field], help=help)


def switched(on: bool, field: str):
    """A switch's value for `AskSettings.from_options`: the opposite of the default when given, else unset."""
    return (not getattr(AskSettings, field)) if on else None


TEMPERATURE = _option("temperature", "0 = greedy and reproducible")
SEED = _option("seed", "sampling seed")
MAX_TOKENS = _option("max_tokens", "token limit per generation pass")
THRESHOLD = _option("cdir_threshold", "CDIR confidence threshold (paper: 0.8)")
TOP_K_DOCS = _option("top_k_docs", "knowledge-base entries per search (default: 1 guided, 3 native and rag)")
MODE = _option("search_mode", "search mode: dense, lexical or hybrid (default: each pack's)")
CTX = _option("n_ctx", "context window (tokens)")
GPU_LAYERS = _option("gpu_layers", "layers to offload to a GPU build of llama.cpp (-1: all)")
THREADS = _option("n_threads", "llama.cpp threads (default: physical cores; 1 is far faster on a machine busy "
                               "with other work)")
SPECULATIVE = _option("speculative", "speculative decoding: off, lookup (copy drafts from the context), draft (the "
                                     "0.5B draft model), auto (lookup on a GPU, off on CPU)")
FRAME = _option("frame", "multi-frame DICOM: the frame (slice) of IMAGE to use, from 0 (default: the middle one)")
TOP_K_DIAGNOSES = _option("top_k_diagnoses", "open-ended: ask for a ranked differential of N (1-10) diagnoses")
PROTOCOL = _option("protocol", "auto, native, guided or rag (auto: native for models trained on Med-RwR, guided "
                               "for the others: the runtime writes the tags, serves a query on every question and "
                               "reads the option letter the model rates highest)")
ENGINE = _option("engine", "URL of an inference server (llama.cpp server, vLLM) that generates the tokens; packs, "
                           "evidence and logs stay here")
ENGINE_TIMEOUT = _option("engine_timeout", "seconds without a byte from --engine before a request is given up")
THINK_TOKENS = _option("guided_think_tokens", "guided/rag: tokens the model may think before its query and before "
                                              "its answer (0: none)")
READ_TOKENS = _option("guided_read_tokens", "guided: tokens the model may write reading the spliced entries before "
                                            "its answer (0: none)")
DOC_WORDS = _option("guided_doc_words", "guided/rag: cut each spliced entry to about N words (0: whole entries)")
EXCERPT = _option("guided_excerpt", "guided/rag: which N words of each entry: focus (the lines matching the "
                                    "question, options and query) or head (the first N)")

# API arguments every answering command (ask, chat, eval, serve) takes the same way
MODEL = typer.Option(None, "--model", "-m", help="GGUF file or installed model name")
PACKS = typer.Option(None, "--pack", "-p", help="knowledge pack (name or path; repeat)")

NO_RETRIEVAL = _switch("retrieval", "answer queries with <retrieve> None")
NO_CDIR = _switch("cdir", "never re-retrieve a reference image")
CDIR_OPEN_ENDED = _switch("cdir_open_ended", "also run CDIR on open-ended answers (mean token probability; off by "
                                             "default)")
ALLOW_MIXED_MODALITIES = _switch("allow_mixed_modalities", "accept priors of another modality than IMAGE (e.g. MR "
                                                           "vs CT)")
NO_EXEMPLAR = _switch("guided_exemplar", "guided/rag: no worked example in the system turn")
