"""The Med-RwR protocol: prompts, tags, query normalisation, retrieve blocks and answer parsing.

Everything here reproduces the published Med-RwR code (xmed-lab/Med-RwR) byte for byte where it matters to the
model: the system prompts it was trained with (note the trailing space at the end of line 2), Qwen ChatML, the
user turn as image(s) first then `question\nA. ...\nB. ...`, and the exact retrieve-block layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from .backend import ImageInput, PromptPart

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
QUERY_OPEN, QUERY_CLOSE = "<query>", "</query>"
RETRIEVE_OPEN, RETRIEVE_CLOSE = "<retrieve>", "</retrieve>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# Shared by every variant: how to query, and the output format. "\n" are real newlines, as in the reference's
# Python source; the first line here ends in a space (line 2 of the prompt).
_RETRIEVAL_INSTRUCTIONS = (
    "During thinking, if needed, retrieve medical knowledge using <query> </query> tags. Only one query is "
    "allowed. An external agent will retrieve information and return it within <retrieve> </retrieve> tags. \n"
    "You can use the retrieved information to continue thinking and further query if more information is "
    "needed. When you can reach a conclusion, output your answer within <answer> </answer> tags.\n"
    "The output should be in the following format:\n"
    "1. If you need more information, output <think> ... </think>\n<query> ... </query>\n"
    "<retrieve> ... </retrieve>\n (Multiple think-query-retrieve cycles may occur)\n"
    "2. If you can directly reach a conclusion without query, output <think> ... </think>\n<answer> ... </answer>"
)

# The image variant, as in the reference's ECBench / demo prompts (sha256 pinned in tests).
SYSTEM_PROMPT_IMAGE = (
    "You are an experienced expert in medicine. You are given a question, an image and a list of choices. "
    "You are required to select the correct answer from the choices.\n"
    "First observe the image, think about the question and each choice within <think> </think> tags. "
    + _RETRIEVAL_INSTRUCTIONS
)

# The text-only variant (MedQA/MedMCQA stage-1 training prompt; sha256 pinned in tests).
SYSTEM_PROMPT_TEXT = (
    "You are an experienced expert in medicine. You are given a question and a list of choices. "
    "You are required to select the correct answer from the choices.\n"
    "First think about the question and each choice within <think> </think> tags. "
    + _RETRIEVAL_INSTRUCTIONS
)

# Open-ended questions (no options): same protocol, free-text answer. Not from the paper; labelled as ours.
SYSTEM_PROMPT_OPEN = (
    "You are an experienced expert in medicine. You are given a question"
    "{image_clause}. Answer it concisely and accurately.\n"
    "First {observe}think about the question within <think> </think> tags. "
) + _RETRIEVAL_INSTRUCTIONS.replace("{", "{{").replace("}", "}}")

# Guided decoding only (ours, never in a native prompt): one worked example appended to the system turn, so a model
# never trained on the protocol sees a query and a one-letter answer before it writes its own. Deliberately outside
# ICD-10-CM, the default pack and the built-in benchmark. The prefix cache makes it free after the first question.
GUIDED_EXEMPLAR = (
    "\n\nAn example (another question):\n"
    "Which vitamin deficiency causes scurvy?\nA. Vitamin A\nB. Vitamin B12\nC. Vitamin C\nD. Vitamin D\n"
    "<think> Scurvy is a deficiency disease; I should check which vitamin. </think>\n"
    "<query> scurvy vitamin deficiency </query>\n"
    "<retrieve> (1) Scurvy: a disease resulting from a lack of vitamin C (ascorbic acid).\n </retrieve>\n"
    "<think> Entry (1) says scurvy results from a lack of vitamin C, which is option C. </think>\n"
    "<answer> C </answer>"
)

# CDIR's spliced reasoning step, as the reference (pt_engine_retrieve_infer_img.py) inserts it before
# regenerating: think, then the query with NO newline before the retrieve block (unlike a model-written query).
CDIR_THINK = (
    "<think> I need to find a consultation from a case with similar medical imaging findings to provide relevant "
    "context and reference. I will use the consultation with previously retrieved information to generate the "
    "answer. </think>\n"
)
CDIR_QUERY = "<query> consultation from similar medical imaging case </query>"

# Qwen2.5-VL's image placeholder in ChatML; the multimodal backend replaces the ImageInput part with embeddings.
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"

OPTION_RE = re.compile(r"^\s*\(?([A-Za-z])[\.\):]\s*(.*\S)\s*$", re.S)


def system_prompt(has_image: bool, open_ended: bool = False) -> str:
    if open_ended:
        return SYSTEM_PROMPT_OPEN.format(
            image_clause=" and an image" if has_image else "",
            observe="observe the image, " if has_image else "",
        )
    return SYSTEM_PROMPT_IMAGE if has_image else SYSTEM_PROMPT_TEXT


@dataclass(frozen=True)
class Option:
    letter: str
    text: str


def parse_options(options: Sequence[str]) -> list[Option]:
    """Accept "A. text" / "A) text" / plain "text" (lettered A, B, ... in order). Letters must be unique."""
    from ..errors import InputError

    parsed: list[Option] = []
    for i, raw in enumerate(options):
        raw = raw.strip()
        if not raw:
            raise InputError(f"option {i + 1} is empty")
        m = OPTION_RE.match(raw)
        if m and len(raw) > 2 and m.group(2):
            parsed.append(Option(m.group(1).upper(), m.group(2).strip()))
        else:
            parsed.append(Option(chr(ord("A") + i), raw))
    letters = [o.letter for o in parsed]
    if len(set(letters)) != len(letters):
        raise InputError(f"option letters repeat: {', '.join(letters)}")
    if len(parsed) > 26:
        raise InputError("at most 26 options")
    for i, o in enumerate(parsed):  # "A. CT", "C. MRI": the model would be asked to choose among letters that skip
        want = chr(ord("A") + i)
        if o.letter != want:
            raise InputError(f"option {i + 1} is lettered {o.letter}, expected {want}: letter the options A, B, C, "
                             "… in order, or leave the letters out")
    return parsed


def user_text(question: str, options: Sequence[Option]) -> str:
    """`question\nA. ...\nB. ...` exactly as the reference builds it (no options: the question alone)."""
    text = question if not options else question + "\n" + "\n".join(f"{o.letter}. {o.text}" for o in options)
    return neutralise_control_tokens(text)


def neutralise_control_tokens(text: str) -> str:
    """`<|im_end|>` typed by a user or found in a document must stay text, not become a control token."""
    return _SPECIAL_RE.sub(lambda m: f"‹|{m.group(1)}|›", text)


def chatml_prompt(system: str, user: str, images: Sequence[ImageInput] = (), vision: bool = False,
                  labels: Sequence[str] = ()) -> list[PromptPart]:
    """Qwen ChatML up to the open assistant header. Images come first in the user turn (Qwen2.5-VL template).

    For a text-only model (`vision=False`) images are NOT put in the prompt: the model cannot see them, and we
    never pretend it did (the evidence record says so).

    `labels` (one per image, from `study_labels`; empty for a single image) name each study: a vision model gets
    "Prior study (2023-04-01):\n<|vision_start|>...<|vision_end|>\n" per image; a text model gets the labels as
    text lines saying the image is not visible to it, so it still knows what the question compares and when.
    """
    parts: list[PromptPart] = [f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"]
    if labels and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    if vision:
        for i, img in enumerate(images):
            if labels:
                parts.append(labels[i] + "\n")
            parts.append(VISION_START)
            parts.append(img)
            parts.append(VISION_END)
            if labels:
                parts.append("\n")
    elif labels:
        parts.extend(f"{label} {IMAGE_NOT_VISIBLE}\n" for label in labels)
    parts.append(f"{user}<|im_end|>\n<|im_start|>assistant\n")
    return _merge_text(parts)


IMAGE_NOT_VISIBLE = "[image not visible to this model]"


def study_labels(images: Sequence[ImageInput]) -> list[str]:
    """'Prior study (2023-04-01):', 'Current study (2024-01-10):' ... for two or more images, in prompt order (priors
    oldest first, numbered when there are several; 'Image 1:', 'Image 2:' for independent figures). A single image gets no label: its prompt stays the reference's
    layout byte for byte. Dates come only from the allow-listed DICOM StudyDate (`ImageInput.study_date`)."""
    if len(images) < 2:
        return []
    n_priors = sum(1 for im in images if im.role == "prior")
    labels, k = [], 0
    for i, im in enumerate(images):
        if im.role == "image":  # independent figures (AskSettings.images_are_studies=False), e.g. MMMU's <image 1>
            labels.append(f"Image {i + 1}:")
            continue
        if im.role == "prior":
            k += 1
            name = f"Prior study {k}" if n_priors > 1 else "Prior study"
        else:
            name = "Current study"
        labels.append(f"{name} ({im.study_date}):" if im.study_date else f"{name}:")
    return labels


def differential_request(n: int) -> str:
    """The user-turn instruction for `--top-k-diagnoses N` (ours, not the paper's; the system prompt is untouched)."""
    if n == 1:
        return f"Give the single most likely diagnosis inside {ANSWER_OPEN} {ANSWER_CLOSE}."
    return (f"List the {n} most likely diagnoses, most likely first, as a numbered list (1. ... {n}. ...) inside "
            f"{ANSWER_OPEN} {ANSWER_CLOSE}.")


_NUMBERED_ITEM = re.compile(r"(?:^|\s)\(?\d{1,2}[.)]\s+")
_ITEM_MARKER = re.compile(r"^\s*(?:\(?\d{1,2}[.):]|[-*\u2022])\s*")


def parse_differential(answer: Optional[str]) -> list[str]:
    """A ranked differential from an answer: one diagnosis per line ("1. X"), or "1. X 2. Y" / "X; Y" on one line.
    Numbering and bullets are removed; the order is the model's ranking."""
    if not answer or not answer.strip():
        return []
    lines = [ln for ln in answer.splitlines() if ln.strip()]
    if len(lines) == 1:
        line = lines[0].strip()
        if _NUMBERED_ITEM.match(line):
            lines = [x for x in _NUMBERED_ITEM.split(line) if x.strip()]
        elif ";" in line:
            lines = line.split(";")
    items = [_ITEM_MARKER.sub("", ln).strip().rstrip(".;,").strip() for ln in lines]
    return [x for x in items if x]


def untagged_answer_span(text: str) -> Optional[tuple[int, int]]:
    """For a turn with no Med-RwR tags (an SFT-only model, e.g. MedE2 stage I): the [start, end) span of `text`
    that is the answer: all of it, or what follows the last `</think>`. None when the text uses <query>,
    <retrieve> or <answer> (a protocol model that failed to answer is not an untagged answer), leaves a
    <think> open, or is empty."""
    if re.search(r"</?(query|retrieve|answer)>", text, re.I):
        return None
    close = text.rfind(THINK_CLOSE)
    start = close + len(THINK_CLOSE) if close >= 0 else 0
    if THINK_OPEN in text[start:]:
        return None
    while start < len(text) and text[start].isspace():
        start += 1
    end = len(text.rstrip())
    return (start, end) if end > start else None


def _merge_text(parts: list[PromptPart]) -> list[PromptPart]:
    merged: list[PromptPart] = []
    for p in parts:
        if isinstance(p, str) and merged and isinstance(merged[-1], str):
            merged[-1] += p
        else:
            merged.append(p)
    return merged


def prompt_text(parts: Sequence[PromptPart]) -> str:
    """The prompt as text, images shown as <|image_pad|> (for records and tests)."""
    return "".join(p if isinstance(p, str) else "<|image_pad|>" for p in parts)


def extract_query(text: str) -> Optional[str]:
    """The first complete `<query>...</query>` of a pass, normalised as the reference does (quotes stripped,
    whitespace collapsed). None when there is no complete query or it is empty."""
    start = text.find(QUERY_OPEN)
    if start < 0:
        return None
    end = text.find(QUERY_CLOSE, start + len(QUERY_OPEN))
    if end < 0:
        return None
    query = text[start + len(QUERY_OPEN) : end].replace('"', "").strip()
    query = " ".join(query.split())
    # "..." (a model copying the prompt's format line) or other punctuation asks for nothing: not a query.
    return query if any(ch.isalnum() for ch in query) else None


_LEADING_NUMBER = re.compile(r"^\d+\s+")


def retrieve_block(docs: Sequence[str]) -> str:
    """`<retrieve> (1) doc\n(2) doc\n(3) doc\n </retrieve>\n`, or `<retrieve> None </retrieve>\n`.

    Leading "<n> " numbering is removed from each doc as the reference does; each doc is flattened to one
    line so a document cannot forge tags or break the numbered layout.
    """
    if not docs:
        return f"{RETRIEVE_OPEN} None {RETRIEVE_CLOSE}\n"
    body = "".join(f"({i + 1}) {_LEADING_NUMBER.sub('', _one_line(d))}\n" for i, d in enumerate(docs))
    return f"{RETRIEVE_OPEN} {body} {RETRIEVE_CLOSE}\n"


def rag_entries(docs) -> str:
    """The `rag` baseline's entries, put before the question in the user turn (ours, not the paper's):
    "Knowledge base entries:\n(1) ..\n(2) ..\n(3) ..\n\n"; nothing when nothing was found."""
    body = "".join(f"({i + 1}) {_LEADING_NUMBER.sub('', _one_line(d))}\n" for i, d in enumerate(docs))
    return f"Knowledge base entries:\n{body}\n" if body else ""


def cdir_block(caption: str) -> str:
    """CDIR's spliced step for a model that cannot see the reference image: its caption only,
    `<retrieve> {caption} </retrieve>\n` (the reference's block without its `<image>`)."""
    return CDIR_THINK + CDIR_QUERY + f"{RETRIEVE_OPEN} {_one_line(caption)} {RETRIEVE_CLOSE}\n"


def cdir_parts(caption: str, image: ImageInput) -> list[PromptPart]:
    """CDIR's spliced step for a vision model: the reference's `<retrieve> <image> {consultation} </retrieve>\n`
    with the similar case's image where the reference writes `<image>`, as Qwen2.5-VL's image span
    (`<|vision_start|>` embeddings `<|vision_end|>`), then its caption. Where this differs from the reference: it
    re-encodes the whole prompt with the similar case's image added to the user turn's image list, and `<image>` in
    its block stays literal text; here the image span sits at that marker and is decoded after the kept turn in
    the KV cache, so the model sees the similar case where it is consulted and nothing before is re-encoded."""
    return [CDIR_THINK + CDIR_QUERY + f"{RETRIEVE_OPEN} {VISION_START}", image,
            f"{VISION_END} {_one_line(caption)} {RETRIEVE_CLOSE}\n"]


def cdir_block_per_study(labelled_captions: Sequence[tuple[str, str]]) -> str:
    """CDIR's step for a text-only model given several studies: the nearest reference of EACH study, labelled
    (a model that sees no image has only these captions to compare prior and current), in the numbered layout
    of a retrieve block. With one study use `cdir_block` (the reference's exact layout)."""
    body = "".join(f"({i + 1}) {_one_line(label)} {_one_line(cap)}\n" for i, (label, cap) in enumerate(labelled_captions))
    return CDIR_THINK + CDIR_QUERY + f"{RETRIEVE_OPEN} {body} {RETRIEVE_CLOSE}\n"


_TAG_RE = re.compile(r"</?(think|query|retrieve|answer)>", re.I)
# Chat-template control tokens (<|im_start|>, <|im_end|>, <|vision_start|>, ...): the backend parses special
# tokens in appended text, so a document must never be able to spell one.
_SPECIAL_RE = re.compile(r"<\|([^|<>]{0,40})\|>")


def _one_line(doc: str) -> str:
    """Flatten a document to one line that cannot forge protocol tags or chat-template control tokens."""
    doc = _TAG_RE.sub(lambda m: m.group(0).replace("<", "‹").replace(">", "›"), doc)
    return " ".join(neutralise_control_tokens(doc).split())


ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)


def parse_answer(text: str) -> Optional[str]:
    """`<answer>(.*?)</answer>` as the paper parses it; the last complete answer wins (there is one in practice)."""
    found = ANSWER_RE.findall(text)
    if not found:
        return None
    return found[-1].strip()


def letter_from_option_text(answer: Optional[str], options: Sequence[Option]) -> Optional[str]:
    """The letter of the option whose text the answer repeats exactly (case and a final '.' ignored).

    Not the paper's rule (first token = letter); the loop uses it only when that rule finds no letter, and says so
    in the record: small models often answer "<answer> I60.9 </answer>" for "A. I60.9"."""
    if not answer:
        return None
    norm = answer.strip().rstrip(".").strip().casefold()
    matches = [o.letter for o in options if o.text.strip().rstrip(".").strip().casefold() == norm]
    return matches[0] if len(matches) == 1 else None


def answer_letter(answer: Optional[str], letters: Sequence[str]) -> Optional[str]:
    """Option = first token of the answer, case-insensitive, '.' stripped (as the reference's accuracy reward);
    "(B)", "B)" and "B:" are read as B too. Anything else is not an option."""
    if not answer:
        return None
    first = answer.split()[0] if answer.split() else ""
    first = first.strip().strip(".").strip("()[]:,").upper()
    if first in {x.upper() for x in letters}:
        return first
    return None
