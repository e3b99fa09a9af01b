"""A self-contained HTML page a clinician can read: what the model looked up, what it read, how sure it was.

One file, no external assets: CSS is inline, images are PNG thumbnails in data: URIs (re-encoded from decoded
pixels, so no DICOM header, EXIF or PNG text chunk can leak into the page), and a Content-Security-Policy meta tag
forbids the page from loading anything else (no network, no scripts). Every piece of text from the record is
HTML-escaped: questions, model output and pack passages are untrusted.

The record holds no pixels. `write_report(record, path, images=[...])` takes the input image files again (each is
checked against the record's sha256) and finds the CDIR reference image in the image pack the record names.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import sqlite3
from pathlib import Path
from typing import Optional, Sequence, Union

from ..errors import InputError
from ..paths import atomic_write_text, sha256_file
from .record import Answer, CdirRetrieve, EvidenceRecord, Query, Retrieve, Think, record_from_dict

PathLike = Union[str, os.PathLike]
THUMBNAIL_PX = 320
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def write_report(
    record: Union[EvidenceRecord, dict],
    path: PathLike,
    images: Sequence[PathLike] = (),
    image_pack: Optional[PathLike] = None,
) -> Path:
    """Render the report and write it atomically (temp file + rename). Returns the path written."""
    page = render_report(record, images=images, image_pack=image_pack)
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory; give the report's file name, e.g. {path / 'report.html'}")
    atomic_write_text(path, page)
    return path


def render_report(
    record: Union[EvidenceRecord, dict],
    images: Sequence[PathLike] = (),
    image_pack: Optional[PathLike] = None,
) -> str:
    rec = record if isinstance(record, EvidenceRecord) else record_from_dict(record)
    inputs = _input_thumbnails(rec, images)
    cdir = rec.cdir()
    reference = _reference_thumbnail(rec, cdir, image_pack) if cdir is not None else None
    body = "\n".join([
        _header(rec),
        _question_section(rec),
        _answer_section(rec),
        _inputs_section(rec, inputs),
        _cdir_section(cdir, inputs, reference) if cdir is not None else "",
        _reasoning_section(rec),
        _provenance_section(rec),
        _notes_section(rec),
        f'<footer>medrwr-edge {e(rec.medrwr_edge_version)} · record schema {e(rec.schema)} · this page loads '
        "nothing from the network and runs no scripts</footer>",
    ])
    title = rec.question if len(rec.question) <= 80 else rec.question[:77] + "…"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="generator" content="medrwr-edge">\n'
        f"<title>Evidence: {e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def e(value) -> str:
    """HTML-escape anything (quotes too, so it is safe inside attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


# ------------------------------------------------------------------------------------------------ images


class Thumbnail:
    def __init__(self, data_uri: Optional[str], sha256: str, label: str, missing_reason: str = ""):
        self.data_uri, self.sha256, self.label, self.missing_reason = data_uri, sha256, label, missing_reason

    def figure(self, css_class: str, caption_html: str = "") -> str:
        if self.data_uri:
            img = f'<img src="{self.data_uri}" alt="{e(self.label)}">'
        else:
            img = f'<div class="no-image">{e(self.missing_reason or "image not available")}</div>'
        return (f'<figure class="{css_class}" data-sha256="{e(self.sha256)}">{img}<figcaption>'
                f'<b>{e(self.label)}</b><br><code title="{e(self.sha256)}">sha256 {e(self.sha256[:16])}…</code>'
                f"{caption_html}</figcaption></figure>")


def _png_data_uri(pixels) -> str:
    from PIL import Image

    im = Image.fromarray(pixels)
    im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)  # a fresh PNG: no text chunks, no EXIF, no DICOM header
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _input_thumbnails(rec: EvidenceRecord, paths: Sequence[PathLike]) -> list[Thumbnail]:
    """One thumbnail per input image of the record, in the record's order; a given file must be one of them."""
    from ..imaging import load_image

    by_hash = {}
    for p in paths:
        loaded = load_image(p)
        if not any(im.get("sha256") == loaded.sha256 for im in rec.images):
            raise InputError(
                f"image {p} is not an input of this record (its sha256 {loaded.sha256[:16]}… matches none of the "
                "record's images)"
            )
        by_hash[loaded.sha256] = _png_data_uri(loaded.pixels)
    out = []
    for i, im in enumerate(rec.images):
        sha = str(im.get("sha256", ""))
        label = study_label(rec.images, i)
        out.append(Thumbnail(by_hash.get(sha), sha, label,
                             "" if sha in by_hash else "not shown: give the image file with --image to include it"))
    return out


def study_label(images: Sequence[dict], i: int) -> str:
    """'Current study', 'Prior study 2 (2023-04-01)': the names the prompt gave the studies (protocol.study_labels),
    from the record's role and allow-listed StudyDate. Records made before roles were dated still read well."""
    im = images[i]
    if im.get("role") == "image":
        return f"Image {i + 1}"
    n_priors = sum(1 for x in images if x.get("role") == "prior")
    if im.get("role") == "prior":
        k = sum(1 for x in images[: i + 1] if x.get("role") == "prior")
        name = f"Prior study {k}" if n_priors > 1 else "Prior study"
    else:
        name = "Current study"
    date = im.get("study_date")
    return f"{name} ({date})" if date else name


def _reference_thumbnail(rec: EvidenceRecord, cdir: CdirRetrieve, image_pack: Optional[PathLike]) -> Thumbnail:
    label = f"Reference {cdir.reference_doc_id}"
    sha = cdir.reference_image_sha256
    pack_dir = Path(image_pack) if image_pack is not None else None
    if pack_dir is None:
        entry = next((p for p in rec.packs if p.get("role") == "cdir-reference-images"
                      and p.get("name") == cdir.reference_pack), None)
        pack_dir = Path(entry["path"]) if entry and entry.get("path") else None
    if pack_dir is None:
        return Thumbnail(None, sha, label, "reference image not shown: the record names no image pack path")
    image_file = _pack_image_file(pack_dir, cdir.reference_doc_id)
    if image_file is None:
        return Thumbnail(None, sha, label, f"reference image not shown: pack {pack_dir} is not available here")
    if sha and sha256_file(image_file) != sha:
        return Thumbnail(None, sha, label, "reference image not shown: the pack's copy differs from the one used")
    from PIL import Image
    import numpy as np

    with Image.open(image_file) as im:
        pixels = np.asarray(im.convert("RGB"))
    return Thumbnail(_png_data_uri(pixels), sha, label)


def _pack_image_file(pack_dir: Path, doc_id: str) -> Optional[Path]:
    db = pack_dir / "docs.sqlite"
    if not db.is_file():
        return None
    try:
        conn = sqlite3.connect(db.resolve().as_uri() + "?mode=ro&immutable=1", uri=True)
        try:
            row = conn.execute("SELECT image_file FROM documents WHERE doc_id = ?", (doc_id,)).fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    if not row or not row[0]:
        return None
    path = (pack_dir / row[0]).resolve()
    if pack_dir.resolve() not in path.parents or not path.is_file():
        return None  # a path outside the pack is never followed
    return path


# ---------------------------------------------------------------------------------------------- sections


def _header(rec: EvidenceRecord) -> str:
    m = rec.model
    return (
        "<header><h1>Evidence report</h1>"
        f'<p class="sub">Answered {e(rec.created)} by <b>{e(m.get("name"))}</b> ({e(m.get("backend"))} on '
        f'{e(m.get("device"))}) · <code title="{e(m.get("sha256"))}">model sha256 {e(str(m.get("sha256", ""))[:16])}…'
        "</code></p></header>"
    )


def _question_section(rec: EvidenceRecord) -> str:
    final = rec.letter
    cdir = rec.cdir()
    before = _letter_of(cdir.answer_before, rec) if cdir is not None and cdir.changed else None
    items = []
    for o in rec.options:
        cls = "chosen" if o.get("letter") == final else "before" if o.get("letter") == before else ""
        mark = " ✓ answer" if cls == "chosen" else " (first answer, before CDIR)" if cls == "before" else ""
        items.append(f'<li class="{cls}" data-letter="{e(o.get("letter"))}"><b>{e(o.get("letter"))}.</b> '
                     f"{e(o.get('text'))}<span class=\"mark\">{e(mark)}</span></li>")
    options = f'<ol class="options">{"".join(items)}</ol>' if items else '<p class="muted">Open-ended question.</p>'
    return (f'<section id="question"><h2>Question</h2><p class="question">{e(rec.question)}</p>{options}'
            "</section>")


def _letter_of(answer: Optional[str], rec: EvidenceRecord) -> Optional[str]:
    from ..runtime.protocol import answer_letter

    return answer_letter(answer, [o.get("letter") for o in rec.options]) if rec.options else None


def gauge(confidence: Optional[float], threshold: Optional[float], label: str, gauge_id: str) -> str:
    """A horizontal bar from 0 to 1 with the CDIR threshold marked (below it: amber). threshold None: no marker
    (an open-ended answer's mean token probability is not compared with the threshold)."""
    if confidence is None:
        return f'<div class="gauge-row" id="{e(gauge_id)}"><span class="gauge-label">{e(label)}</span> not available</div>'
    pct = max(0.0, min(1.0, float(confidence))) * 100
    if threshold is None:
        state, marker, note, t_attr = "neutral", "", "no CDIR threshold applies", ""
    else:
        state = "below" if confidence < threshold else "above"
        t_pct = max(0.0, min(1.0, float(threshold))) * 100
        marker = f'<div class="gauge-threshold" style="left:{t_pct:.1f}%" title="CDIR threshold {threshold:.2f}"></div>'
        note = f'{"below" if state == "below" else "at or above"} the CDIR threshold {threshold:.2f}'
        t_attr = f' data-threshold="{threshold:.4f}"'
    return (
        f'<div class="gauge-row" id="{e(gauge_id)}"><span class="gauge-label">{e(label)}</span>'
        f'<div class="gauge {state}" role="meter" aria-valuemin="0" aria-valuemax="1" '
        f'aria-valuenow="{confidence:.4f}" aria-label="{e(label)}" data-confidence="{confidence:.4f}"{t_attr}>'
        f'<div class="gauge-fill" style="width:{pct:.1f}%"></div>{marker}</div>'
        f'<span class="gauge-value">{confidence:.2f}</span><span class="gauge-note">{e(note)}</span></div>'
    )


def _answer_section(rec: EvidenceRecord) -> str:
    threshold = float(rec.settings.get("cdir_threshold", 0.8))
    if rec.status != "answered":
        head = '<p class="final no-answer" id="final-answer">No answer: the model did not give one.</p>'
    else:
        shown = rec.letter or rec.answer
        extra = f' <span class="answer-text">({e(rec.answer)})</span>' if rec.letter and rec.answer != rec.letter else ""
        head = f'<p class="final" id="final-answer">Answer: <b>{e(shown)}</b>{extra}</p>'
    kind = {
        "first-answer-token": "probability the model gave the answer's first token (the option letter); "
                              "CDIR consults a reference image below the threshold",
        "mean-answer-token": "mean token probability of a free-text answer; not comparable to a letter "
                             "confidence, and CDIR does not use it",
        "none": "no confidence: no answer was given",
    }.get(rec.confidence_kind, rec.confidence_kind)
    cdir = rec.cdir()
    if cdir is not None:
        gauges = (gauge(cdir.confidence_before, cdir.threshold, "first answer", "gauge-before")
                  + gauge(cdir.confidence_after, cdir.threshold, "after CDIR", "confidence-gauge"))
    elif rec.confidence_kind == "mean-answer-token":
        gauges = gauge(rec.confidence, None, "mean token probability", "confidence-gauge")
    else:
        gauges = gauge(rec.confidence, threshold, "confidence", "confidence-gauge")
    return (f'<section id="answer"><h2>Answer</h2>{head}<div class="gauges">{gauges}</div>'
            f'<p class="muted">Confidence: {e(kind)}.</p></section>')


def _inputs_section(rec: EvidenceRecord, thumbs: list[Thumbnail]) -> str:
    if not thumbs:
        return '<section id="inputs"><h2>Input images</h2><p class="muted">No image: a text-only question.</p></section>'
    figs = []
    for thumb, im in zip(thumbs, rec.images):
        meta = im.get("meta") or {}
        facts = [f"{e(im.get('format'))} {e(im.get('width'))}×{e(im.get('height'))}"]
        for key in ("modality", "body_part", "view_position", "laterality"):
            if meta.get(key):
                facts.append(f"{e(key.replace('_', ' '))}: {e(meta[key])}")
        role = "prior" if im.get("role") == "prior" else "current"
        figs.append(thumb.figure(f"input {role}", "<br>" + " · ".join(facts)))
    return f'<section id="inputs"><h2>Input images</h2><div class="figures">{"".join(figs)}</div></section>'


def _cdir_section(cdir: CdirRetrieve, inputs: list[Thumbnail], reference: Thumbnail) -> str:
    current = inputs[-1] if inputs else Thumbnail(None, "", "Input image", "no input image")
    if cdir.answer_after is None:
        verdict = "The regeneration gave no usable answer; the first answer stands."
    elif cdir.changed:
        verdict = f"CDIR changed the answer: {cdir.answer_before} → {cdir.answer_after}."
    else:
        verdict = f"CDIR did not change the answer ({cdir.answer_after})."
    saw = ("The model saw the reference image." if cdir.model_saw_reference_image
           else "The model is text-only: it read the reference caption, not the image.")
    caption = (f'<br><span class="caption">{e(cdir.reference_caption)}</span><br>'
               f'<span class="muted">{e(cdir.reference_pack)} {e(cdir.reference_pack_version)} · similarity '
               f"{cdir.reference_score:.3f}</span>")
    return (
        '<section id="cdir"><h2>Confidence-driven image re-retrieval (CDIR)</h2>'
        f"<p>The first answer's confidence {_fmt(cdir.confidence_before)} was below the threshold "
        f"{cdir.threshold:.2f}, so the most similar reference image was looked up and its caption added before "
        f'answering again. {e(saw)}</p><div class="figures side-by-side">'
        f'{current.figure("input")}{reference.figure("reference", caption)}</div>'
        f'<p class="verdict {"changed" if cdir.changed else "unchanged"}" id="cdir-verdict">{e(verdict)}</p></section>'
    )


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}"


_THINK_TAG_RE = re.compile(r"</?think>")
_QUERY_TAG_RE = re.compile(r"&lt;query&gt;(.*?)&lt;/query&gt;", re.S)


def highlight_queries(text: str) -> str:
    """Escape the text, then wrap each <query>…</query> in <mark> (escaping first keeps the markup ours)."""
    return _QUERY_TAG_RE.sub(r'<mark class="q">&lt;query&gt;\1&lt;/query&gt;</mark>', e(text))


def _reasoning_section(rec: EvidenceRecord) -> str:
    parts = []
    for step in rec.steps:
        if isinstance(step, Think):
            text = _THINK_TAG_RE.sub("", step.text).strip()  # the THINK label already says what it is
            if text:
                parts.append(f'<div class="step think"><span class="tag">think</span>{highlight_queries(text)}</div>')
        elif isinstance(step, Query):
            status = "" if step.served else f' <span class="unserved">not served: {e(step.reason)}</span>'
            parts.append(f'<div class="step query"><mark class="q">&lt;query&gt; {e(step.raw)} &lt;/query&gt;</mark>'
                         f"{status}</div>")
        elif isinstance(step, Retrieve):
            parts.append(_retrieve_html(step))
        elif isinstance(step, Answer):
            conf = "" if step.confidence is None else f' <span class="muted">confidence {step.confidence:.2f}</span>'
            parts.append(f'<div class="step answer-step"><span class="tag">answer</span>{e(step.text)}{conf}</div>')
        elif isinstance(step, CdirRetrieve):
            parts.append(f'<div class="step cdir-step"><span class="tag">CDIR</span>reference '
                         f'{e(step.reference_doc_id)} from {e(step.reference_pack)}: '
                         f"{e(step.reference_caption)}</div>")
    full = (f'<details class="full-turn"><summary>The whole assistant turn, as the model saw and wrote it</summary>'
            f'<pre>{highlight_queries(rec.assistant_text)}</pre></details>')
    return f'<section id="reasoning"><h2>Reasoning</h2>{"".join(parts)}{full}</section>'


def _retrieve_html(step: Retrieve) -> str:
    if not step.docs:
        return (f'<div class="step retrieve empty"><span class="tag">retrieve</span>nothing retrieved for '
                f"“{e(step.query)}” (the model was given &lt;retrieve&gt; None &lt;/retrieve&gt;)</div>")
    docs = []
    for i, d in enumerate(step.docs, 1):
        preview = d.snippet if len(d.snippet) <= 90 else d.snippet[:88] + "…"
        docs.append(
            f'<li><details class="passage" data-pack="{e(d.pack)}" data-doc-id="{e(d.doc_id)}" '
            f'data-score="{d.score:.6f}"><summary><span class="doc-id">{e(d.doc_id)}</span> '
            f'<span class="pack">{e(d.pack)} {e(d.pack_version)}</span> <span class="score">score {d.score:.3f}</span>'
            f' <span class="preview">{e(preview)}</span></summary><p class="snippet">{e(d.snippet)}</p>'
            f'<p class="muted">{e(d.source)}{" · " if d.source else ""}search: {e(d.mode)}</p></details></li>'
        )
    shortened = ' <span class="muted">(shortened to fit the context)</span>' if step.truncated else ""
    return (f'<div class="step retrieve"><span class="tag">retrieve</span>{len(step.docs)} passage(s) for '
            f"“{e(step.query)}”, {step.tokens_inserted} tokens added to the turn{shortened}"
            f'<ol class="passages">{"".join(docs)}</ol></div>')


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _provenance_section(rec: EvidenceRecord) -> str:
    m = rec.model
    model = _table([("model", e(m.get("name"))), ("sha256", f"<code>{e(m.get('sha256'))}</code>"),
                    ("backend", e(m.get("backend"))), ("device", e(m.get("device"))),
                    ("sees images", "yes" if m.get("has_vision") else "no (text-only)")])
    packs = "".join(
        f"<tr><td>{e(p.get('name'))}</td><td>{e(p.get('version'))}</td><td>{e(p.get('role'))}</td>"
        f"<td>{e(p.get('doc_count', ''))}</td><td><code title=\"{e(p.get('manifest_sha256'))}\">"
        f"{e(str(p.get('manifest_sha256', ''))[:16])}…</code></td><td><code title=\"{e(p.get('encoder_sha256'))}\">"
        f"{e(str(p.get('encoder_sha256', ''))[:16])}…</code></td></tr>"
        for p in rec.packs
    )
    packs_html = ("<table><tr><th>pack</th><th>version</th><th>role</th><th>documents</th><th>manifest sha256</th>"
                  f"<th>encoder sha256</th></tr>{packs}</table>") if rec.packs else "<p>No knowledge pack.</p>"
    settings = _table([(k, e(v)) for k, v in rec.settings.items()])
    passes = "".join(f"<tr><td>{p.index}</td><td>{e(p.kind)}</td><td>{p.generated_tokens}</td>"
                     f"<td>{p.inserted_tokens}</td><td>{e(p.stop_reason)}</td></tr>" for p in rec.passes)
    tokens = _table([(k, e(v)) for k, v in rec.tokens.items()] + [(f"{k} (s)", e(v)) for k, v in rec.timings.items()])
    return (
        '<section id="provenance"><h2>Provenance (for replay)</h2><div class="cols"><div><h3>Model</h3>'
        f"{model}<h3>Settings</h3>{settings}</div><div><h3>Knowledge packs</h3>{packs_html}<h3>Passes</h3>"
        "<table><tr><th>pass</th><th>kind</th><th>generated</th><th>inserted after</th><th>stopped by</th></tr>"
        f"{passes}</table><h3>Tokens and timings</h3>{tokens}</div></div></section>"
    )


def _notes_section(rec: EvidenceRecord) -> str:
    if not rec.notes:
        return ""
    items = "".join(f"<li>{e(n)}</li>" for n in rec.notes)
    return f'<section id="notes"><h2>Notes</h2><ul>{items}</ul></section>'


STYLE = """
:root{--ink:#1b2430;--muted:#5b6675;--line:#d8dee6;--accent:#0b6e99;--warn:#b36b00;--ok:#2f7d32;--q:#fff1a8}
*{box-sizing:border-box}body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);
max-width:1100px;margin:0 auto;padding:1.5rem;background:#fff}
h1{font-size:1.5rem;margin:0}h2{font-size:1.15rem;border-bottom:1px solid var(--line);padding-bottom:.2rem;
margin-top:1.8rem}h3{font-size:1rem;margin:1rem 0 .3rem}.sub,.muted{color:var(--muted)}
code,pre{font:12.5px/1.45 ui-monospace,Menlo,Consolas,monospace}pre{white-space:pre-wrap;word-break:break-word;
background:#f6f8fa;padding:.8rem;border-radius:6px}
.question{font-size:1.1rem;white-space:pre-wrap}.options{list-style:none;padding:0}
.options li{padding:.25rem .5rem;border-radius:4px;margin:.1rem 0}.options li.chosen{background:#e3f2e4;font-weight:600}
.options li.before{background:#fdf0dc}.options .mark{color:var(--muted);font-weight:400}
.final{font-size:1.25rem}.final b{color:var(--ok)}.no-answer{color:#b00020}
.gauge-row{display:flex;align-items:center;gap:.7rem;margin:.35rem 0}.gauge-label{width:7.5rem;color:var(--muted)}
.gauge{position:relative;width:320px;height:16px;background:#eceff3;border-radius:8px;overflow:visible}
.gauge-fill{height:100%;border-radius:8px;background:var(--ok)}.gauge.neutral .gauge-fill{background:var(--accent)}.gauge.below .gauge-fill{background:var(--warn)}
.gauge-threshold{position:absolute;top:-5px;width:2px;height:26px;background:#b00020}
.gauge-value{font-weight:700;width:3rem}.gauge-note{color:var(--muted);font-size:.9rem}
.figures{display:flex;flex-wrap:wrap;gap:1rem}figure{margin:0;max-width:340px;border:1px solid var(--line);
border-radius:6px;padding:.5rem}figure img{display:block;max-width:320px;max-height:320px;image-rendering:auto}
figcaption{font-size:.85rem;margin-top:.3rem}.no-image{width:320px;height:120px;display:flex;align-items:center;
justify-content:center;text-align:center;background:#f3f4f6;color:var(--muted);font-size:.85rem;padding:.5rem}
.side-by-side figure.reference{border-color:#8e44ad}.caption{white-space:pre-wrap}
.verdict{font-weight:600}.verdict.changed{color:var(--warn)}.verdict.unchanged{color:var(--ok)}
.step{margin:.45rem 0;padding:.45rem .6rem;border-left:3px solid var(--line);white-space:pre-wrap}
.step .tag{display:inline-block;font:11px ui-monospace,monospace;text-transform:uppercase;color:#fff;
background:var(--muted);border-radius:3px;padding:0 .35rem;margin-right:.5rem;vertical-align:1px}
.step.query{border-color:#e0b400}mark.q{background:var(--q);padding:0 .15rem;border-radius:3px}
.step.retrieve{border-color:var(--accent);white-space:normal}.step.retrieve .tag{background:var(--accent)}
.step.answer-step{border-color:var(--ok)}.step.answer-step .tag{background:var(--ok)}
.step.cdir-step{border-color:#8e44ad}.step.cdir-step .tag{background:#8e44ad}.unserved{color:#b00020}
.passages{margin:.4rem 0 0;padding-left:1.4rem}.passage summary{cursor:pointer}.passage .doc-id{font-weight:700}
.passage .pack{color:var(--accent)}.passage .score{font-family:ui-monospace,monospace;font-size:.85rem}
.passage .preview{color:var(--muted)}.passage[open] .preview{display:none}.snippet{white-space:pre-wrap;margin:.3rem 0}
details.full-turn{margin-top:1rem}details.full-turn summary{cursor:pointer;color:var(--accent)}
table{border-collapse:collapse;font-size:.85rem;margin-bottom:.5rem}th,td{border:1px solid var(--line);
padding:.2rem .45rem;text-align:left;vertical-align:top}th{background:#f6f8fa;font-weight:600}
.cols{display:grid;grid-template-columns:1fr 1.4fr;gap:1.5rem}@media (max-width:800px){.cols{grid-template-columns:1fr}}
footer{margin-top:2rem;color:var(--muted);font-size:.8rem;border-top:1px solid var(--line);padding-top:.5rem}
@media print{details>*{display:block}body{max-width:none}}
"""
