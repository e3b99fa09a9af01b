"""`medrwr-edge replay RECORD|LOG_ID`: prove an answer can be reproduced, or show where it no longer is.

1. Verify what the answer depended on, by hash, before running anything: the model file (full sha256), every
   pack (full verification of its files, its manifest digest and its encoder lock against the record, and the
   locked encoder itself when the pack's search needs it), and the input images (the user gives them again;
   the record only holds their sha256).
2. Re-run the question with the recorded settings and seed through `Session`.
3. Compare with the record: the prompt, then the assistant turn character by character, then the number of tokens
   each pass generated. At temperature 0 on the same machine and build the output must be identical; otherwise
   report the first divergence (the pass, the character offset, and both texts around it).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from ..errors import InputError, IntegrityError, ModelError
from ..paths import sha256_file
from ..runtime.steps import CdirRetrieve, EvidenceRecord, Query, Retrieve
from .record_io import read_record_json, record_from_dict

PathLike = Union[str, os.PathLike]
REPLAY_SCHEMA = "medrwr-edge/replay/1"
SNIPPET_BEFORE, SNIPPET_AFTER = 40, 80


@dataclass
class Divergence:
    where: str  # "prompt", "pass 1 (reasoning)", "retrieve block after pass 0", "CDIR block", ...
    pass_index: Optional[int]
    offset: int  # character offset in the assistant turn (or in the prompt when where == "prompt")
    recorded: str  # text around the offset, as recorded
    replayed: str  # text around the offset, as replayed
    detail: str = ""


@dataclass
class ReplayResult:
    source: str
    identical: bool
    verified: list[str]
    divergence: Optional[Divergence]
    recorded_pass_tokens: list[int]
    replayed_pass_tokens: list[int]
    differences: list[str] = field(default_factory=list)  # other fields that differ (answer, confidence, docs)
    notes: list[str] = field(default_factory=list)
    replayed: Optional[EvidenceRecord] = None
    same_setup: bool = True  # same backend, device, offload, llama.cpp build and KV settings as the record

    def to_dict(self) -> dict:
        return {
            "schema": REPLAY_SCHEMA,
            "source": self.source,
            "identical": self.identical,
            "same_setup": self.same_setup,
            "verified": list(self.verified),
            "divergence": dataclasses.asdict(self.divergence) if self.divergence else None,
            "passes": {"recorded": self.recorded_pass_tokens, "replayed": self.replayed_pass_tokens},
            "differences": list(self.differences),
            "notes": list(self.notes),
            "replayed_record": self.replayed.to_dict() if self.replayed is not None else None,
        }


# ------------------------------------------------------------------------------------------------ sources


def load_source(source: str, log_path: Optional[PathLike] = None) -> tuple[dict, str]:
    """A record from a JSON file ('-' = stdin) or a log id. Returns (record dict, a label for messages)."""
    src = str(source)
    if src == "-" or Path(src).is_file():
        return read_record_json(src), src
    if src.isdigit():
        from .log import read_logged_record

        return read_logged_record(int(src), log_path), f"log id {src}"
    raise InputError(f"{src} is neither an evidence record file nor a log id (see `medrwr-edge logs`)")


# --------------------------------------------------------------------------------------------- verifying


def verify_model(rec: EvidenceRecord, model: Optional[PathLike] = None, backend=None) -> tuple[Optional[Path], str]:
    want = str(rec.model.get("sha256", ""))
    if backend is not None:  # an injected backend (API use, tests): it reports the hash of what it runs
        got = backend.info.model_sha256
        if got != want:
            raise IntegrityError(f"the model has sha256 {got[:16]}…, the record used {want[:16]}…: not the same model")
        return None, f"model {rec.model.get('name')} sha256 {want[:16]}… (backend {backend.info.name})"
    path = Path(model) if model is not None else Path(str(rec.model.get("path", "")))
    if not str(path) or not path.is_file():
        raise ModelError(
            f"the model the record used ({rec.model.get('name')}) is not at {path}; give its location with --model"
        )
    got = sha256_file(path)  # a full hash, never the size/mtime cache: this is the audit
    if got != want:
        raise IntegrityError(
            f"model {path} has sha256 {got[:16]}…, the record used {want[:16]}…: not the same model file"
        )
    return path, f"model {path.name} sha256 {got[:16]}… matches the record"


def verify_packs(rec: EvidenceRecord, overrides: Optional[dict[str, PathLike]] = None) -> tuple[list[Path], Optional[Path], list[str]]:
    """Full verification of every pack the record used; returns (knowledge pack paths, image pack path, lines)."""
    from ..kb_pack.pack import Pack

    overrides = dict(overrides or {})
    text_paths: list[Path] = []
    image_path: Optional[Path] = None
    lines = []
    mode = rec.settings.get("search_mode")
    for entry in rec.packs:
        if entry.get("role") == "patient-history":
            continue  # checked by verify_history: it is opened by the patient's key, not a path
        name = str(entry.get("name", ""))
        path = Path(overrides.pop(name)) if name in overrides else Path(str(entry.get("path", "")))
        if not str(path) or not path.exists():
            raise InputError(f"pack {name} is not at {path}; give its location with --pack {name}=PATH")
        pack = Pack.open(path, verify="full")  # every file's sha256, document count, index size
        try:
            for key, have in (("name", pack.name), ("version", pack.version), ("kind", pack.kind),
                              ("manifest_sha256", pack.manifest.get("manifest_sha256", "")),
                              ("encoder_sha256", pack.encoder_sha256)):
                want = entry.get(key)
                if want is not None and str(want) != str(have):
                    raise IntegrityError(
                        f"pack at {path}: {key} is {str(have)[:24]}, the record used {str(want)[:24]}: not the same pack"
                    )
            needs_encoder = pack.kind == "image" or (mode or pack.default_mode) in ("dense", "hybrid")
            if needs_encoder:
                pack.encoder()  # loads the installed encoder, checking its files against the lock
                enc = f"encoder {pack.encoder_sha256[:16]}… verified"
            else:
                enc = "encoder not used (lexical search)"
            lines.append(f"pack {pack.name} {pack.version}: all files and manifest {entry.get('manifest_sha256', '')[:16]}… "
                         f"match the record; {enc}")
        finally:
            pack.close()
        if entry.get("role") == "cdir-reference-images" or pack.kind == "image":
            image_path = path
        else:
            text_paths.append(path)
    if overrides:
        raise InputError(f"--pack {', '.join(overrides)}: the record used no pack of that name")
    return text_paths, image_path, lines


def verify_history(rec: EvidenceRecord, history: Optional[str]) -> list[str]:
    """The patient history the record searched must open with `history` (the key) in the same state."""
    entries = [e for e in rec.packs if e.get("role") == "patient-history"]
    if not entries:
        if history is not None:
            raise InputError("--history: the record searched no patient history")
        return []
    if history is None:
        raise InputError("this answer searched a patient history: give the patient's key with --history KEY")
    from ..history.store import open_history_for_record

    pack, record = open_history_for_record(history, entries[0])
    pack.close()
    return [f"patient history {str(record['history_id'])[:12]}… revision {record['version']} matches the record"]


def verify_images(rec: EvidenceRecord, images: Sequence[PathLike]) -> list[str]:
    if len(images) != len(rec.images):
        if rec.images and not images:
            raise InputError(f"the record has {len(rec.images)} input image(s); give them again with --image PATH "
                             "(in the same order) so their sha256 can be checked")
        raise InputError(f"the record has {len(rec.images)} input image(s), {len(images)} given")
    lines = []
    for i, (path, want) in enumerate(zip(images, rec.images), 1):
        if not Path(path).is_file():
            raise InputError(f"image file not found: {path}")
        got = sha256_file(path)
        if got != want.get("sha256"):
            raise IntegrityError(
                f"image {path} has sha256 {got[:16]}…, the record's image {i} has {str(want.get('sha256'))[:16]}…: "
                "not the same image"
            )
        lines.append(f"image {i} ({want.get('role')}) sha256 {got[:16]}… matches the record")
    return lines


# -------------------------------------------------------------------------------------------------- replay


def replay(
    record: Union[EvidenceRecord, dict],
    images: Sequence[PathLike] = (),
    *,
    model: Optional[PathLike] = None,
    packs: Optional[dict[str, PathLike]] = None,
    backend=None,
    source: str = "record",
    history: Optional[str] = None,
) -> ReplayResult:
    """Verify the record's model, packs and images, answer again with its settings, and compare."""
    from ..runtime.api import AskSettings, Session

    rec = record if isinstance(record, EvidenceRecord) else record_from_dict(record)
    fields = {f.name for f in dataclasses.fields(AskSettings)}
    unknown = sorted(set(rec.settings) - fields)
    if unknown:
        raise InputError(f"the record has settings this medrwr-edge does not know ({', '.join(unknown)}); "
                         "replay it with the version that made it")
    settings = AskSettings(**rec.settings)

    verified = verify_images(rec, images)
    model_path, line = verify_model(rec, model, backend)
    verified.insert(0, line)
    text_paths, image_pack, pack_lines = verify_packs(rec, packs)
    verified += pack_lines
    verified += verify_history(rec, history)

    notes = []
    if settings.temperature > 0:
        notes.append(f"temperature {settings.temperature} > 0: identical output needs the same seed, machine and build")
    options = [f"{o['letter']}. {o['text']}" for o in rec.options]
    # image_pack=False: the original run had no image pack, so the installed default must not be picked up.
    with Session(packs=[str(p) for p in text_paths], image_pack=image_pack if image_pack is not None else False,
                 model=model_path, settings=settings, backend=backend, history=history) as session:
        again = session.ask([Path(p) for p in images] or None, rec.question, options or None)

    # A logged record has its study dates cut to the year (evidence/log.py): cut the new run's the same way.
    from .log import scrub_study_dates

    identical, divergence, differences = compare(record_from_dict(scrub_study_dates(rec.to_dict())),
                                                 record_from_dict(scrub_study_dates(again.to_dict())))
    setup = setup_differences(rec.model, again.model)
    notes += [f"recorded on another setup: {d}" for d in setup]
    if setup:
        notes.append("the same model on another device, build or batch setting may round differently: a token "
                     "match here is not a bit-identical reproduction, and a divergence is not by itself an error")
    if rec.medrwr_edge_version and rec.medrwr_edge_version != again.medrwr_edge_version:
        notes.append(f"recorded with medrwr-edge {rec.medrwr_edge_version}, replayed with {again.medrwr_edge_version}")
    return ReplayResult(source, identical, verified, divergence, [p.generated_tokens for p in rec.passes],
                        [p.generated_tokens for p in again.passes], differences, notes, again, same_setup=not setup)


# Model-entry fields that decide the computed numbers (record.model; see BackendInfo.build / .compute).
SETUP_KEYS = ("backend", "device", "gpu_layers", "build", "compute")


def setup_differences(recorded: dict, replayed: dict) -> list[str]:
    """What differs between the setup that made the record and the one replaying it; [] = the same setup.
    A record from before the build was recorded cannot show it is the same: that is said too."""
    out = []
    for key in SETUP_KEYS:
        if key not in recorded:
            out.append(f"the record does not name its {key} (made by an older medrwr-edge)")
        elif recorded[key] != replayed.get(key):
            out.append(f"{key} was {recorded[key]!r}, now {replayed.get(key)!r}")
    return out


# ------------------------------------------------------------------------------------------------ compare


def compare(recorded: EvidenceRecord, replayed: EvidenceRecord) -> tuple[bool, Optional[Divergence], list[str]]:
    """(identical, first divergence, other differences). Identical = same prompt, same assistant turn and the
    same number of tokens in every pass (same text from a different token split counts as a divergence)."""
    differences = _other_differences(recorded, replayed)
    if recorded.prompt != replayed.prompt:
        at = _first_difference(recorded.prompt, replayed.prompt)
        return False, Divergence("prompt", None, at, *_snippets(recorded.prompt, replayed.prompt, at),
                                 detail="the prompt itself differs (another protocol version?)"), differences
    a, b = recorded.assistant_text, replayed.assistant_text
    if a != b:
        at = _first_difference(a, b)
        where, pass_index = locate(recorded, at)
        return False, Divergence(where, pass_index, at, *_snippets(a, b, at)), differences
    step = _step_divergence(recorded, replayed)
    if step is not None:
        return False, step, differences
    ra = [(p.kind, p.generated_tokens) for p in recorded.passes]
    rb = [(p.kind, p.generated_tokens) for p in replayed.passes]
    if ra != rb:
        i = next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
        detail = (f"same text, but pass {i} generated {ra[i][1] if i < len(ra) else 'no'} tokens in the record and "
                  f"{rb[i][1] if i < len(rb) else 'no'} in the replay")
        start = next((s for s, _, _, p in segments(recorded) if p == i), 0)
        return False, Divergence(f"pass {i}", i, start, *_snippets(a, b, start), detail=detail), differences
    return True, None, differences


def _step_text(step) -> tuple[str, str]:
    """(kind, text) of a step as the model wrote or was given it."""
    if isinstance(step, Query):
        return "query", step.raw
    if isinstance(step, (Retrieve, CdirRetrieve)):
        return step.type, step.block
    return step.type, step.text or ""


def _step_divergence(recorded: EvidenceRecord, replayed: EvidenceRecord) -> Optional[Divergence]:
    """Same turn, but different steps: the answering pass that CDIR rolled back is not in the final turn, only
    in its think/answer steps, so it is compared here."""
    in_turn = {p for _, _, _, p in segments(recorded) if p is not None}
    for a, b in zip(recorded.steps, replayed.steps):
        (ka, ta), (kb, tb) = _step_text(a), _step_text(b)
        p = getattr(a, "pass_index", None)  # a CDIR step has none: it sits between passes
        if (ka, ta, p) == (kb, tb, getattr(b, "pass_index", None)):
            continue
        where = f"{ka} step" if p is None else f"{ka} step of pass {p}" + ("" if p in in_turn else ", rolled back by CDIR")
        at = _first_difference(ta, tb)
        return Divergence(where, p, at, *_snippets(ta, tb, at),
                          detail=f"the final turns match; the {ka} step differs (offset is within the step)")
    if len(recorded.steps) != len(replayed.steps):
        return Divergence("steps", None, 0, str(len(recorded.steps)), str(len(replayed.steps)),
                          detail=f"{len(recorded.steps)} steps recorded, {len(replayed.steps)} replayed")
    return None


def _first_difference(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _snippets(a: str, b: str, at: int) -> tuple[str, str]:
    lo = max(0, at - SNIPPET_BEFORE)
    return a[lo : at + SNIPPET_AFTER], b[lo : at + SNIPPET_AFTER]


def segments(rec: EvidenceRecord) -> list[tuple[int, int, str, Optional[int]]]:
    """Split the assistant turn into (start, end, label, pass index): generated text per pass and spliced blocks.

    The turn is pass 0's text, its retrieve block, pass 1's text, ...; after CDIR the low-confidence answering
    pass was rolled back, so the turn continues with the CDIR block and the CDIR pass's text."""
    text, pos, out = rec.assistant_text, 0, []
    retrieves = {r.pass_index: r for r in rec.retrievals()}
    cdir = rec.cdir()
    reasoning = [p for p in rec.passes if p.kind == "reasoning"]
    for p in reasoning:
        r = retrieves.get(p.index)
        if r is not None:
            at = text.find(r.block, pos)
            if at < 0:
                break
            out.append((pos, at, f"pass {p.index} (reasoning)", p.index))
            out.append((at, at + len(r.block), f"retrieve block after pass {p.index}", p.index))
            pos = at + len(r.block)
        elif cdir is None:
            out.append((pos, len(text), f"pass {p.index} (reasoning)", p.index))
            pos = len(text)
    if cdir is not None:
        at = text.find(cdir.block, pos)
        if at >= 0:
            out.append((at, at + len(cdir.block), "CDIR block", None))
            cdir_pass = next((p.index for p in rec.passes if p.kind == "cdir"), None)
            out.append((at + len(cdir.block), len(text), f"pass {cdir_pass} (CDIR regeneration)", cdir_pass))
    return out


def locate(rec: EvidenceRecord, offset: int) -> tuple[str, Optional[int]]:
    """Which part of the recorded turn a character offset falls in (end of text: the last part)."""
    segs = segments(rec)
    for start, end, label, pass_index in segs:
        if start <= offset < end:
            return label, pass_index
    if segs and offset >= segs[-1][1]:
        return segs[-1][2] + ", at its end", segs[-1][3]
    return "assistant turn", None


def _other_differences(a: EvidenceRecord, b: EvidenceRecord) -> list[str]:
    out = []
    for key in ("status", "answer", "letter", "confidence_kind"):
        if getattr(a, key) != getattr(b, key):
            out.append(f"{key}: recorded {getattr(a, key)!r}, replayed {getattr(b, key)!r}")
    if a.confidence != b.confidence:
        out.append(f"confidence: recorded {a.confidence!r}, replayed {b.confidence!r}")
    docs_a = [[(d.pack, d.doc_id) for d in r.docs] for r in a.retrievals()]
    docs_b = [[(d.pack, d.doc_id) for d in r.docs] for r in b.retrievals()]
    if docs_a != docs_b:
        out.append(f"retrieved documents: recorded {docs_a}, replayed {docs_b}")
    ca, cb = a.cdir(), b.cdir()
    if (ca is None) != (cb is None):
        out.append(f"CDIR: {'taken' if ca else 'not taken'} in the record, {'taken' if cb else 'not taken'} in the replay")
    elif ca is not None and (ca.reference_doc_id, ca.changed) != (cb.reference_doc_id, cb.changed):
        out.append(f"CDIR reference/change: recorded {(ca.reference_doc_id, ca.changed)}, "
                   f"replayed {(cb.reference_doc_id, cb.changed)}")
    return out
