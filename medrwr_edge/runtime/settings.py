"""`AskSettings`: everything that decides an answer, defaulted here only and checked once, when it is made.

Front ends pass only what their user set: the CLI's options default to None ("unset", runtime/cli_options.py),
serve takes a JSON object of changes, eval its modes; `settings.replace(**changes)` is a checked copy. An error
names the field (`SettingError.field`); the CLI (medrwr_edge/cli.py) and serve (serve/app.py) word it in their own
vocabulary. `Question.check` is the one check of a question and its options.

Imports only the standard library at load time: the CLI reads the defaults from here to show them in --help.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import InputError, SettingError

PROTOCOL_CHOICES = ("auto", "native", "guided", "rag")
SPECULATIVE_MODES = ("off", "lookup", "draft", "auto")
EXCERPT_CHOICES = ("focus", "head")
# Documents per search when `top_k_docs` is unset. native: 3, what the loop has always served a Med-RwR model;
# rag: 3, the baseline as the issue that asked for it defines it; guided: 1, measured (README, "What helped"): the
# untrained models read the first entry better without the next two beside it.
TOP_K_DOCS = {"native": 3, "guided": 1, "rag": 3}
MAX_QUESTION_CHARS = 20_000
MAX_DIAGNOSES = 10


@dataclass(frozen=True)
class AskSettings:
    """Everything that decides the answer; recorded in the evidence so a run can be replayed.

    Frozen and checked on construction: a settings object that exists is a valid one. `replace(**changes)` gives
    a checked copy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k_sampling: int = 0  # sampling: keep the k most likely tokens (0: off)
    seed: int = 0
    max_tokens: int = 512  # per generation pass
    max_passes: int = 3
    top_k_docs: Optional[int] = None  # documents per search; None: the protocol's (TOP_K_DOCS below)
    retrieval: bool = True
    cdir: bool = True
    cdir_threshold: float = 0.8  # the paper's value
    search_mode: Optional[str] = None  # None: each pack's default
    n_ctx: int = 8192
    gpu_layers: int = 0
    prefix_cache: bool = True  # keep the system prompt's KV state on disk: faster first token, same output
    n_threads: Optional[int] = None  # llama.cpp threads (None: physical cores); 1 is far faster on a busy CPU
    top_k_diagnoses: Optional[int] = None  # open-ended: ask for a ranked differential of N (1..10) diagnoses
    cdir_open_ended: bool = False  # CDIR on open-ended answers (their mean token probability); off by default
    allow_mixed_modalities: bool = False  # accept a prior of another modality than the current image
    # Several images are a patient's studies (priors + current: dated labels, one modality). False: independent
    # figures of one question (MMMU's <image 1>, <image 2>): labelled "Image 1:", ..., no order or modality rules.
    images_are_studies: bool = True
    frame: Optional[int] = None  # multi-frame DICOM: which frame (slice) of the current image; None: the middle
    # "auto": native for models trained on the Med-RwR protocol (exported Med-RwR bundles, GGUFs that declare it),
    # guided for every other model; "native": the paper's protocol byte for byte; "guided": protocol guidance
    # (runtime/loop.py); "rag": the baseline (one search on the question, entries in the user turn)
    protocol: str = "auto"
    # guided/rag: thinking before the query and the answer. 0, as measured in the README: the untrained model's
    # thinking was not shown to help, and it costs decode time
    guided_think_tokens: int = 0
    # guided: the model's reading note after the spliced entries, before its answer ("<think> Entry (1) says ...,
    # which is option C. </think>", as in the worked example): at most N tokens. 0, as measured in the README: the
    # note broke more right answers than it fixed
    guided_read_tokens: int = 0
    guided_exemplar: bool = True  # guided/rag, multiple choice: a worked example in the system turn
    guided_doc_words: int = 40  # guided/rag: each spliced entry cut to about N words (0: whole entries)
    # guided/rag: which N words. "focus": the entry's first line, then its lines (and list items) sharing the most
    # terms with the question, options and query (runtime/excerpt.py); "head": its first N words
    guided_excerpt: str = "focus"
    engine: Optional[str] = None  # URL of an inference server (llama.cpp server, vLLM) that generates the tokens
    engine_timeout: float = 120.0  # seconds without a byte from that server before a request is given up
    # Speculative decoding (runtime/speculative.py): off, lookup (drafts copied from the sequence), draft (a small
    # model of the same tokenizer, `draft_model` or the installed Qwen2.5-Coder-0.5B), auto (lookup on a GPU, off on
    # CPU, where speculation measured slower). Greedy output is plain decoding's (README: speculative decoding).
    speculative: str = "auto"
    draft_model: Optional[str] = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _typed(f.name, f.type, getattr(self, f.name)))
        for name, allowed, problem in _RULES:
            value = getattr(self, name)
            if value is not None and not allowed(value):
                raise SettingError(name, f"{problem} (got {value!r})")

    @classmethod
    def from_options(cls, **options) -> "AskSettings":
        """The defaults changed by the options a front end's user set; None means unset."""
        return cls().replace(**{k: v for k, v in options.items() if v is not None})

    def replace(self, **changes) -> "AskSettings":
        """A checked copy with `changes` (AskSettings field names)."""
        unknown = sorted(set(changes) - FIELD_NAMES)
        if unknown:
            raise TypeError(f"unknown setting {unknown[0]!r}")
        return dataclasses.replace(self, **changes) if changes else self

    def resolved_protocol(self, backend) -> str:
        if self.protocol != "auto":
            return self.protocol
        return "native" if backend.info.declares_protocol else "guided"

    def for_protocol(self, protocol: str) -> "AskSettings":
        """These settings with the unset ones that depend on the protocol that runs filled in (what is recorded)."""
        return self if self.top_k_docs is not None else self.replace(top_k_docs=TOP_K_DOCS[protocol])

    def loop_config(self, protocol: str = "native"):
        """The pass loop's configuration (runtime/loop.py) for the protocol that runs."""
        from .loop import LoopConfig

        s = self.for_protocol(protocol)
        return LoopConfig(
            protocol=protocol,
            guided_think_tokens=s.guided_think_tokens,
            guided_read_tokens=s.guided_read_tokens,
            guided_exemplar=s.guided_exemplar,
            guided_doc_words=s.guided_doc_words,
            guided_excerpt=s.guided_excerpt,
            max_passes=s.max_passes,
            top_k_docs=s.top_k_docs,
            retrieval=s.retrieval,
            cdir=s.cdir,
            cdir_threshold=s.cdir_threshold,
            cdir_open_ended=s.cdir_open_ended,
            top_k_diagnoses=s.top_k_diagnoses,
            sampling=s.sampling(),
            generation_reserve_tokens=min(s.max_tokens, 512),
        )

    def sampling(self):
        from .backend import SamplingSettings

        return SamplingSettings(self.temperature, self.top_p, self.top_k_sampling, self.seed, self.max_tokens)


FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(AskSettings))

# (field, allowed(value), what the value must be); None always passes for an Optional field.
_RULES = (
    ("temperature", lambda v: v >= 0, "must be ≥ 0"),
    ("top_p", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("top_k_sampling", lambda v: v >= 0, "must be ≥ 0 (0: off)"),
    ("max_tokens", lambda v: v >= 1, "must be at least 1"),
    ("max_passes", lambda v: v >= 1, "must be at least 1"),
    ("top_k_docs", lambda v: v >= 1, "must be at least 1"),
    ("cdir_threshold", lambda v: 0 <= v <= 1, "must be between 0 and 1"),
    ("search_mode", lambda v: v in _search_modes(), "must be dense, lexical or hybrid"),
    ("n_ctx", lambda v: v >= 512, "is too small (at least 512 tokens)"),
    ("n_threads", lambda v: v >= 1, "must be at least 1"),
    ("top_k_diagnoses", lambda v: 1 <= v <= MAX_DIAGNOSES, f"must be between 1 and {MAX_DIAGNOSES}"),
    ("frame", lambda v: v >= 0, "must be a frame number ≥ 0"),
    ("protocol", lambda v: v in PROTOCOL_CHOICES, f"must be one of {', '.join(PROTOCOL_CHOICES)}"),
    ("guided_think_tokens", lambda v: v >= 0, "must be ≥ 0"),
    ("guided_read_tokens", lambda v: v >= 0, "must be ≥ 0"),
    ("guided_doc_words", lambda v: v >= 0, "must be ≥ 0 (0: whole entries)"),
    ("guided_excerpt", lambda v: v in EXCERPT_CHOICES, f"must be one of {', '.join(EXCERPT_CHOICES)}"),
    ("engine_timeout", lambda v: v > 0, "must be more than 0 seconds"),
    ("speculative", lambda v: v in SPECULATIVE_MODES, f"must be one of {', '.join(SPECULATIVE_MODES)}"),
)


def _search_modes() -> tuple:
    """The packs' search modes (kb_pack/pack.py owns them; imported only when a mode is asked for)."""
    from ..kb_pack.pack import SEARCH_MODES

    return SEARCH_MODES


_KINDS = {"bool": (bool, "true or false"), "int": (numbers.Integral, "an integer"),
          "float": (numbers.Real, "a number"), "str": (str, "a string")}


def _typed(name: str, annotation: str, value):
    """`value` checked against the field's annotation ("int", "Optional[str]", ...); integers become floats where a
    number is asked for (a JSON 1 for 1.0)."""
    optional = annotation.startswith("Optional[")
    kind, words = _KINDS[annotation[len("Optional["):-1] if optional else annotation]
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise SettingError(name, f"must be {words}" + (" or null" if optional else ""))
    if kind is numbers.Real:
        if not math.isfinite(value):
            raise SettingError(name, f"must be a finite number (got {value!r})")
        return float(value)
    return int(value) if kind is numbers.Integral else value


@dataclass(frozen=True)
class Question:
    """A question and its options, checked once: the text stripped, the options parsed (runtime/protocol.py)."""

    text: str
    options: tuple = ()  # protocol.Option, lettered A, B, ...

    @classmethod
    def check(cls, question, options: Optional[Sequence[str]] = None,
              settings: Optional[AskSettings] = None) -> "Question":
        from .protocol import parse_options

        text = check_text(question)
        parsed = tuple(parse_options(options or []))
        if settings is not None and settings.top_k_diagnoses is not None and parsed:
            raise SettingError("top_k_diagnoses", "asks for a ranked differential of an open-ended question; it "
                                                  "cannot be combined with options")
        return cls(text, parsed)

    def option_dicts(self) -> list[dict]:
        return [{"letter": o.letter, "text": o.text} for o in self.options]


def check_text(question) -> str:
    """A question or chat message: UTF-8 text, not empty, within MAX_QUESTION_CHARS; returned stripped."""
    if isinstance(question, bytes):
        try:
            question = question.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError("the question is not valid UTF-8 text") from None
    if not isinstance(question, str) or not question.strip():
        raise InputError("the question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise InputError(f"the question is {len(question):,} characters; the limit is {MAX_QUESTION_CHARS:,}")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("the question contains characters that are not valid Unicode text") from None
    return question.strip()
