"""`POST /v1/chat/completions` in the OpenAI chat format, so existing clients can call Med-RwR unchanged.

The request's last user message is the question (text parts joined; images as base64 data URLs); lines such as
"A. Pneumonia" become the options unless `medrwr_options` is given. Med-RwR's system prompt is fixed by the
protocol, so system messages and earlier turns are ignored. The reply's `content` is the answer; the reasoning
(with the retrieved passages spliced in) is `reasoning_content`; the whole evidence record is `medrwr_evidence`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import InputError

_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s+(\S.*)$")


@dataclass
class ChatQuestion:
    question: str
    options: list[str]
    image_urls: list[str] = field(default_factory=list)


def parse_chat_request(body: dict) -> ChatQuestion:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InputError("'messages' must be a non-empty list")
    user = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), None)
    if user is None:
        raise InputError("'messages' has no user message")
    content = user.get("content")
    texts, urls = [], []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for i, part in enumerate(content):
            if not isinstance(part, dict):
                raise InputError(f"message content part {i + 1} must be an object")
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise InputError(f"message content part {i + 1}: 'text' must be a string")
                texts.append(part["text"])
            elif kind == "image_url":
                ref = part.get("image_url")
                urls.append(ref.get("url") if isinstance(ref, dict) else ref)
            else:
                raise InputError(f"message content part {i + 1}: unsupported type {str(kind)[:40]!r}")
    else:
        raise InputError("the user message's 'content' must be a string or a list of parts")
    text = "\n".join(texts)
    given = body.get("medrwr_options")
    if given is not None:
        if not isinstance(given, list) or not all(isinstance(o, str) for o in given):
            raise InputError("'medrwr_options' must be a list of strings such as \"A. Pneumonia\"")
        return ChatQuestion(text.strip(), list(given), urls)
    question_lines, options = [], []
    for line in text.splitlines():
        m = _OPTION_LINE.match(line)
        if m:
            options.append(f"{m.group(1)}. {m.group(2).strip()}")
        else:
            question_lines.append(line)
    if len(options) < 2:  # a lone "A. ..." line is more likely part of the question than a one-option MCQ
        return ChatQuestion(text.strip(), [], urls)
    return ChatQuestion("\n".join(question_lines).strip(), options, urls)


def chat_settings(body: dict) -> dict:
    """OpenAI sampling fields mapped onto AskSettings names (plus `medrwr_settings` for the rest)."""
    out: dict[str, Any] = {}
    for openai_name, ours in (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"),
                              ("max_tokens", "max_tokens"), ("max_completion_tokens", "max_tokens")):
        if body.get(openai_name) is not None:
            out[ours] = body[openai_name]
    extra = body.get("medrwr_settings")
    if extra is not None:
        if not isinstance(extra, dict):
            raise InputError("'medrwr_settings' must be a JSON object")
        out.update(extra)
    if body.get("n", 1) != 1:
        raise InputError("only n=1 is supported")
    return out


def _usage(record: dict) -> dict:
    t = record.get("tokens", {})
    prompt = int(t.get("prompt", 0)) + int(t.get("prompt_cached", 0))
    completion = int(t.get("generated", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def answer_content(record: dict) -> str:
    return record.get("answer") or ""


def completion_response(request_id: str, created: int, model: str, record: dict) -> dict:
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": answer_content(record),
                        "reasoning_content": record.get("assistant_text", "")},
            "finish_reason": "stop",
        }],
        "usage": _usage(record),
        "medrwr_evidence": record,
    }


def completion_chunk(request_id: str, created: int, model: str, delta: dict,
                     finish_reason: Optional[str] = None, **extra) -> dict:
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        **extra,
    }


def final_chunk(request_id: str, created: int, model: str, record: dict) -> dict:
    return completion_chunk(request_id, created, model, {}, "stop", usage=_usage(record), medrwr_evidence=record)
