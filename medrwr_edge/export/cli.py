"""`medrwr-edge export …`: checkpoint -> edge model bundle (needs the `[export]` extra: torch, transformers).

    medrwr-edge export CHECKPOINT_DIR OUT_DIR [--quant q4_k_m|q5_k_m|q8_0|f16|f32] [--vision-int8] [--no-mmproj]
    medrwr-edge export verify BUNDLE_DIR          re-hash every file of a bundle against its manifest
    medrwr-edge export encoder HF_DIR OUT         a BERT/XLM-R text encoder -> ONNX via optimum + encoder.json
    medrwr-edge export fetch-converter           fetch + verify the llama.cpp converter (online, once)

`export CHECKPOINT OUT` is shorthand for `export model CHECKPOINT OUT`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup


class _ModelIsDefault(TyperGroup):
    """`export CKPT OUT` runs `export model CKPT OUT`: the first argument is a path, not a sub-command name."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["model", *args]
        return super().parse_args(ctx, args)


export_app = typer.Typer(cls=_ModelIsDefault, no_args_is_help=True, add_completion=False)


@export_app.command("model")
def export_model_cmd(
    checkpoint: Path = typer.Argument(..., help="Hugging Face Qwen2.5-VL checkpoint directory (Med-RwR)"),
    out: Path = typer.Argument(..., help="bundle directory to create (written atomically)"),
    quant: str = typer.Option("q4_k_m", "--quant", help="text decoder: q4_k_m, q5_k_m, q8_0, f16 or f32"),
    vision_int8: bool = typer.Option(False, "--vision-int8", help="also keep an int8 vision encoder if cosine >= 0.99"),
    mmproj: bool = typer.Option(True, "--mmproj/--no-mmproj", help="also write llama.cpp's mmproj GGUF"),
    image_encoder: bool = typer.Option(True, "--image-encoder/--no-image-encoder",
                                       help="also write the pooled vision tower as an image-pack encoder"),
    parity: Optional[bool] = typer.Option(
        None, "--parity/--no-parity",
        help="parity gates vs torch (default: on; the whole model up to 2 GB of weights, layer by layer above; "
             "--parity: the whole model always; --no-parity: skipped, and recorded in the manifest)"),
    llama_cpp_src: Optional[Path] = typer.Option(None, "--llama-cpp-src",
                                                 help="llama-cpp-python 0.3.36 sdist (.tar.gz) or unpacked tree"),
    max_pixels: int = typer.Option(262144, "--max-pixels", help="image pixel budget (Med-RwR training: 262144)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
) -> None:
    """Export a Qwen2.5-VL checkpoint: GGUF decoder + ONNX vision encoder (+ mmproj) with a verified manifest."""
    from .qwen import export_model

    def say(msg: str) -> None:
        typer.echo(f"· {msg}", err=True)

    result = export_model(checkpoint, out, quant=quant, vision_int8=vision_int8, mmproj=mmproj,
                          image_encoder=image_encoder, parity=parity,
                          llama_cpp_src=llama_cpp_src, max_pixels=max_pixels, overwrite=overwrite, progress=say)
    typer.echo(str(result))


@export_app.command("verify")
def verify_cmd(bundle: Path = typer.Argument(..., help="model bundle directory")) -> None:
    """Re-hash every file of a model bundle against its manifest."""
    from .bundle import verify_bundle

    from .bundle import parity_summary

    manifest = verify_bundle(bundle)
    typer.echo(f"ok: {len(manifest['files'])} files match {bundle / 'manifest.json'}")
    typer.echo(parity_summary(manifest))


@export_app.command("encoder")
def export_encoder_cmd(
    hf_dir: Path = typer.Argument(..., help="Hugging Face text encoder directory (BERT / XLM-R family)"),
    out: Path = typer.Argument(..., help="encoder directory to create (ONNX + tokenizer.json + encoder.json)"),
    name: Optional[str] = typer.Option(None, "--name", help="encoder name recorded in packs (default: directory name)"),
    pooling: str = typer.Option("cls", "--pooling", help="cls (BGE-M3, MedCPT) or mean (sentence-transformers)"),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="L2-normalise the vectors"),
    query_prefix: str = typer.Option("", "--query-prefix", help="instruction prepended to queries"),
    document_prefix: str = typer.Option("", "--document-prefix", help="text prepended to documents"),
    max_length: int = typer.Option(512, "--max-length", help="token limit per text"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
) -> None:
    """Export a text encoder through optimum's ONNX exporter, with the spec the pack format expects."""
    from .text_encoder import export_text_encoder

    result = export_text_encoder(hf_dir, out, name=name, pooling=pooling, normalize=normalize,
                                 query_prefix=query_prefix, document_prefix=document_prefix, max_length=max_length,
                                 overwrite=overwrite, progress=lambda m: typer.echo(f"· {m}", err=True))
    typer.echo(str(result))


@export_app.command("static-encoder")
def export_static_encoder_cmd(
    out: Path = typer.Argument(..., help="static encoder directory to create (vectors.npy + tokenizer.json + encoder.json)"),
    source: Optional[Path] = typer.Option(None, "--from", help="source text encoder dir (default: installed MiniLM)"),
    name: Optional[str] = typer.Option(None, "--name", help="encoder name recorded in packs (default: directory name)"),
    output: str = typer.Option("token", "--output", help="token (the token position's output) or mean (3-position mean)"),
    weighting: str = typer.Option("sif", "--weighting", help="sif (a/(a+p), p from ICD-10-CM tokens) or none"),
    sif_a: float = typer.Option(1e-4, "--sif-a", help="SIF constant a"),
    pca: bool = typer.Option(True, "--pca/--no-pca", help="centre + rotate onto principal axes"),
    dims: Optional[int] = typer.Option(None, "--dims", help="keep this many principal axes (default: all)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
) -> None:
    """Distil a static (token-vector) text encoder from a transformer one: numpy-only pack builds (no torch)."""
    from ..kb_pack.static_encoder import distil_static_encoder

    if source is None:
        from ..assets import default_text_encoder_dir

        source = Path(default_text_encoder_dir())
    result = distil_static_encoder(source, out, name=name, output=output, weighting=weighting, sif_a=sif_a, pca=pca,
                                   dims=dims, overwrite=overwrite, progress=lambda m: typer.echo(f"· {m}", err=True))
    typer.echo(str(result))


@export_app.command("fetch-converter")
def fetch_converter_cmd(
    llama_cpp_src: Optional[Path] = typer.Option(None, "--llama-cpp-src", help="use this sdist instead of downloading"),
) -> None:
    """Download (or take) and verify the llama.cpp converter source into the cache (the export's online step)."""
    from . import llama_cpp_src as LS

    src = LS.obtain(llama_cpp_src, progress=lambda m: typer.echo(f"· {m}", err=True))
    typer.echo(f"llama.cpp {src.commit} at {src.root}")


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export", help="Export trained checkpoints to edge artefacts (needs the export extra).")
