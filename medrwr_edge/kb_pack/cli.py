"""`medrwr-edge pack …`: build, verify, inspect, search and diff knowledge packs.

JSON outputs (`--json`) carry a "schema" field and keep their keys stable:

* `pack info --json`    -> "medrwr-edge/pack-info/1": path, name, version, kind, format_version, created,
                           doc_count, encoder{name, sha256, dim}, hnsw{...}, search{mode, fusion, ...}, build{...},
                           files (count), bytes (total)
* `pack search --json`  -> "medrwr-edge/pack-search/1": pack, query, mode, k, hits[{doc_id, text, score, source,
                           title, caption, image_path, metadata, ranks{dense, lexical, exact, fused}, mode}]
* `pack verify --json`  -> "medrwr-edge/pack-verify/1": pack, ok, problems[]
* `pack diff --json`    -> "medrwr-edge/pack-diff/1": old, new, encoder_changed, added[], removed[], changed[],
                           unchanged
* `pack build … --json` -> "medrwr-edge/pack-build/1": path, name, version, kind, doc_count

Errors are `MedrwrError`s; the top-level CLI prints them as one line and exits non-zero.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import InputError, IntegrityError
from ..paths import packs_dir

pack_app = typer.Typer(no_args_is_help=True, add_completion=False)
build_app = typer.Typer(no_args_is_help=True, help="Build a pack from text, ICD-10-CM, or captioned images.")
pack_app.add_typer(build_app, name="build")


def _echo_json(obj: dict) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False))


def _out_path(out: Optional[Path], name: str) -> Path:
    return out if out is not None else packs_dir() / name


def _text_encoder(encoder_dir: Optional[Path]):
    from .encoders import load_encoder

    if encoder_dir is None:
        from ..assets import default_text_encoder_dir

        encoder_dir = Path(default_text_encoder_dir())
    return load_encoder(encoder_dir)


def _image_encoder(encoder_dir: Optional[Path]):
    from .encoders import load_encoder

    if encoder_dir is None:
        from ..assets import default_image_encoder_dir

        encoder_dir = Path(default_image_encoder_dir())
    return load_encoder(encoder_dir)


def _hnsw(m: Optional[int], ef_construction: Optional[int], ef_search: Optional[int]):
    from .pack import HnswParams

    d = HnswParams()
    params = HnswParams(M=m or d.M, ef_construction=ef_construction or d.ef_construction,
                        ef_search=ef_search or d.ef_search)
    if params.M < 2 or params.ef_construction < 1 or params.ef_search < 1:
        raise InputError("--M must be ≥ 2 and --ef-construction/--ef-search ≥ 1")
    return params


def _report_built(path: Path, as_json: bool) -> None:
    from .pack import Pack

    with Pack.open(path) as pack:
        if as_json:
            _echo_json({"schema": "medrwr-edge/pack-build/1", "path": str(path.resolve()), "name": pack.name,
                        "version": pack.version, "kind": pack.kind, "doc_count": pack.doc_count})
        else:
            typer.echo(f"built {pack.kind} pack {pack.name} {pack.version}: {pack.doc_count} documents -> {path}")


# Options shared by the build commands.
OUT = typer.Option(None, "--out", "-o", help="Pack directory to create (default: <data dir>/packs/<name>).")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing pack at --out.")
ENCODER = typer.Option(None, "--encoder", help="Encoder directory (default: the installed default encoder).")
M_OPT = typer.Option(None, "--M", help="hnsw M (graph degree).")
EFC_OPT = typer.Option(None, "--ef-construction", help="hnsw ef_construction.")
EFS_OPT = typer.Option(None, "--ef-search", help="hnsw ef at query time.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")
JSON_OPT = typer.Option(False, "--json", help="Machine-readable output.")


@build_app.command("text")
def build_text(
    source: Path = typer.Argument(..., help=".jsonl, .csv or a folder of .txt/.md files"),
    out: Optional[Path] = OUT,
    name: str = typer.Option(..., "--name", help="Pack name."),
    version: str = typer.Option(..., "--version", help="Pack version (free text, e.g. 2026-04)."),
    chunk_words: int = typer.Option(0, "--chunk-words", help="Split texts into chunks of ≤ N words (0: no chunking)."),
    min_words: int = typer.Option(100, "--min-words", help="Smallest chunk when chunking (paper: 100)."),
    overlap: int = typer.Option(20, "--overlap", help="Words shared by consecutive chunks."),
    encoder: Optional[Path] = ENCODER,
    mode: str = typer.Option("hybrid", "--mode", help="Default search mode: dense, lexical or hybrid."),
    m: Optional[int] = M_OPT, ef_construction: Optional[int] = EFC_OPT, ef_search: Optional[int] = EFS_OPT,
    overwrite: bool = OVERWRITE, quiet: bool = QUIET, as_json: bool = JSON_OPT,
):
    """Build a text pack from a JSONL/CSV file or a folder."""
    from .build import build_text_pack
    from .sources import chunk_documents, read_text_source

    docs = list(read_text_source(source))
    params = {"chunk_words": chunk_words}
    if chunk_words:
        docs = list(chunk_documents(docs, min_words=min(min_words, chunk_words), max_words=chunk_words, overlap=overlap))
        params.update(min_words=min(min_words, chunk_words), overlap=overlap)
    path = build_text_pack(docs, _out_path(out, name), _text_encoder(encoder), name=name, version=version,
                           hnsw=_hnsw(m, ef_construction, ef_search), search_mode=mode,
                           source_description=f"{Path(source).name}", build_params=params,
                           overwrite=overwrite, progress=not quiet)
    _report_built(path, as_json)


@build_app.command("icd10")
def build_icd10(
    out: Optional[Path] = OUT,
    name: str = typer.Option("icd10cm", "--name"),
    version: str = typer.Option("2026-04", "--version", help="ICD-10-CM release shipped by simple-icd-10-cm 1.5.0."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N entries (tabular order)."),
    chapters: Optional[List[str]] = typer.Option(None, "--chapters", help="Chapter numbers: 2,9,10 or repeated."),
    default_subset: bool = typer.Option(False, "--default-subset", help="The imaging quick-start subset."),
    encoder: Optional[Path] = ENCODER,
    mode: str = typer.Option("hybrid", "--mode"),
    m: Optional[int] = M_OPT, ef_construction: Optional[int] = EFC_OPT, ef_search: Optional[int] = EFS_OPT,
    overwrite: bool = OVERWRITE, quiet: bool = QUIET, as_json: bool = JSON_OPT,
):
    """Build the ICD-10-CM pack (offline, from the simple-icd-10-cm package data)."""
    from . import icd10
    from .build import build_text_pack

    chapters = [c.strip() for item in (chapters or []) for c in item.split(",") if c.strip()]
    if chapters:
        chapters = sorted(icd10._normalise_chapters(chapters))  # InputError for anything but 1-22
    if default_subset:
        if chapters:
            raise InputError("--default-subset and --chapters cannot be combined")
        docs = list(icd10.default_pack_documents(limit=limit))
        desc = "ICD-10-CM imaging quick-start subset"
    else:
        docs = list(icd10.icd10_documents(limit=limit, chapters=chapters or None))
        desc = "ICD-10-CM" + (f" chapters {','.join(map(str, chapters))}" if chapters else "")
    path = build_text_pack(docs, _out_path(out, name), _text_encoder(encoder), name=name, version=version,
                           hnsw=_hnsw(m, ef_construction, ef_search), search_mode=mode,
                           source_description=f"{desc} ({icd10.SOURCE})",
                           build_params={"limit": limit, "chapters": chapters,
                                         "default_subset": default_subset},
                           overwrite=overwrite, progress=not quiet)
    _report_built(path, as_json)


@build_app.command("images")
def build_images(
    captions: Path = typer.Argument(..., help="CSV or JSONL with image (relative path) and caption columns."),
    out: Optional[Path] = OUT,
    name: str = typer.Option(None, "--name", help="Pack name (default: the captions file's stem)."),
    version: str = typer.Option("1", "--version"),
    encoder: Optional[Path] = ENCODER,
    m: Optional[int] = M_OPT, ef_construction: Optional[int] = EFC_OPT, ef_search: Optional[int] = EFS_OPT,
    overwrite: bool = OVERWRITE, quiet: bool = QUIET, as_json: bool = JSON_OPT,
):
    """Build an image pack (CDIR reference images) from captioned images."""
    from .build import build_image_pack
    from .sources import read_image_captions

    name = name or Path(captions).stem
    docs = list(read_image_captions(captions))
    path = build_image_pack(docs, _out_path(out, name), _image_encoder(encoder), name=name, version=version,
                            hnsw=_hnsw(m, ef_construction, ef_search), source_description=Path(captions).name,
                            overwrite=overwrite, progress=not quiet)
    _report_built(path, as_json)


@build_app.command("reference-images")
def build_reference_images(
    out: Optional[Path] = OUT,
    name: str = typer.Option("reference-images", "--name"),
    version: str = typer.Option("1", "--version"),
    encoder: Optional[Path] = ENCODER,
    overwrite: bool = OVERWRITE, quiet: bool = QUIET, as_json: bool = JSON_OPT,
):
    """Build the default CDIR reference-image pack from images shipped with installed packages."""
    import tempfile

    from .build import build_image_pack
    from .reference_images import default_reference_documents

    with tempfile.TemporaryDirectory(prefix="medrwr-refimg-") as work:
        docs = list(default_reference_documents(Path(work)))
        path = build_image_pack(docs, _out_path(out, name), _image_encoder(encoder), name=name, version=version,
                                source_description="default reference images (medrwr_edge.kb_pack.reference_images)",
                                overwrite=overwrite, progress=not quiet)
    _report_built(path, as_json)


@pack_app.command("verify")
def verify(pack: str = typer.Argument(..., help="Pack directory or installed pack name."), as_json: bool = JSON_OPT):
    """Check every file's sha256 and the pack's internal consistency. Exit 0 if intact, 1 otherwise."""
    from .pack import Pack, check_files, read_manifest, resolve_pack_path

    path = resolve_pack_path(pack)
    if not path.is_dir():
        raise InputError(f"pack not found: {pack}")
    try:
        manifest = read_manifest(path)
        problems = check_files(path, manifest, full=True)
        if not problems:
            with Pack.open(path) as p:
                problems = p.verify()
    except IntegrityError as e:
        problems = [str(e)]
    if as_json:
        _echo_json({"schema": "medrwr-edge/pack-verify/1", "pack": str(path), "ok": not problems, "problems": problems})
    elif problems:
        for problem in problems:
            typer.echo(f"problem: {problem}", err=True)
        typer.echo(f"pack {path}: {len(problems)} problem(s)", err=True)
    else:
        typer.echo(f"pack {path}: ok")
    raise typer.Exit(1 if problems else 0)


@pack_app.command("info")
def info(pack: str = typer.Argument(...), as_json: bool = JSON_OPT):
    """Show a pack's manifest summary."""
    from .pack import Pack

    with Pack.open(pack) as p:
        data = p.info()
    if as_json:
        _echo_json(data)
        return
    typer.echo(f"{data['name']} {data['version']}  ({data['kind']} pack, format {data['format_version']})")
    typer.echo(f"  path:      {data['path']}")
    typer.echo(f"  created:   {data['created']}")
    typer.echo(f"  documents: {data['doc_count']}")
    typer.echo(f"  encoder:   {data['encoder']['name']} (dim {data['encoder']['dim']}, sha256 {data['encoder']['sha256']})")
    h = data["hnsw"]
    typer.echo(f"  hnsw:      space={h['space']} M={h['M']} ef_construction={h['ef_construction']} ef_search={h['ef_search']}")
    typer.echo(f"  search:    default mode {data['search']['mode']}, fusion {data['search'].get('fusion', {}).get('method')}")
    typer.echo(f"  source:    {data['build'].get('source', '')}")
    typer.echo(f"  files:     {data['files']} ({data['bytes'] / 1e6:.1f} MB)")


@pack_app.command("search")
def search(
    pack: str = typer.Argument(...),
    query: Optional[str] = typer.Argument(None, help="Text query (omit with --image)."),
    k: int = typer.Option(3, "-k", "--k", help="Number of results."),
    mode: Optional[str] = typer.Option(None, "--mode", help="dense, lexical or hybrid (default: the pack's)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Query image (image packs)."),
    encoder: Optional[Path] = ENCODER,
    as_json: bool = JSON_OPT,
):
    """Search a pack with text or (for image packs) an image."""
    from .pack import Pack

    if (query is None) == (image is None):
        raise InputError("give either a text query or --image FILE (not both)")
    enc = None
    if encoder is not None:
        from .encoders import load_encoder

        enc = load_encoder(encoder)
    with Pack.open(pack, encoder=enc) as p:
        if image is not None:
            from ..imaging import load_image

            q = load_image(image)
            shown = str(image)
        else:
            q = query
            shown = query
        hits = p.search(q, k=k, mode=mode)
        used_mode = hits[0].mode if hits else (mode or p.default_mode)
        if as_json:
            _echo_json({"schema": "medrwr-edge/pack-search/1", "pack": p.name, "query": shown, "mode": used_mode,
                        "k": k, "hits": [h.to_dict() for h in hits]})
            return
        if not hits:
            typer.echo("no results")
        for i, h in enumerate(hits, start=1):
            ranks = ", ".join(f"{key} {v}" for key, v in h.ranks.items() if v is not None and key != "fused")
            typer.echo(f"{i}. [{h.doc_id}] {h.title or ''}  (score {h.score:.4f}; {ranks})")
            body = h.caption if p.kind == "image" else h.text
            typer.echo(f"   {body[:300]}{'…' if len(body) > 300 else ''}")
            if h.image_path:
                typer.echo(f"   image: {h.image_path}")


@pack_app.command("diff")
def diff(old: str = typer.Argument(...), new: str = typer.Argument(...), as_json: bool = JSON_OPT):
    """Documents added, removed and changed between two packs."""
    from .diff import diff_packs

    d = diff_packs(old, new)
    if as_json:
        _echo_json(d.to_dict())
        return
    typer.echo(f"{d.old['name']} {d.old['version']} ({d.old['doc_count']} docs) -> "
               f"{d.new['name']} {d.new['version']} ({d.new['doc_count']} docs)")
    if d.encoder_changed:
        typer.echo("encoder changed: every vector differs")
    for label, ids in (("added", d.added), ("removed", d.removed), ("changed", d.changed)):
        typer.echo(f"{label}: {len(ids)}")
        for doc_id in ids[:20]:
            typer.echo(f"  {doc_id}")
        if len(ids) > 20:
            typer.echo(f"  … {len(ids) - 20} more (use --json for all)")
    typer.echo(f"unchanged: {d.unchanged}")


@pack_app.command("export")
def export(pack: str = typer.Argument(...), out: Path = typer.Option(..., "--out", "-o", help="The .tar to write.")):
    """Write a pack as one uncompressed .tar for transport (fixed member order and mtimes: reproducible)."""
    import tempfile

    from .pack import MANIFEST_FILE, Pack

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with Pack.open(pack, verify="full") as p:
        mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for rel in [MANIFEST_FILE] + sorted(p.manifest["files"]):
                    path = p.path / rel
                    info = tarfile.TarInfo(f"{p.name}/{rel}")
                    info.size, info.mtime, info.mode = path.stat().st_size, mtime, 0o644
                    with open(path, "rb") as src:
                        tar.addfile(info, src)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    typer.echo(f"exported {p.name} {p.version} -> {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(pack_app, name="pack", help="Build, verify, inspect, search and diff knowledge packs.")
