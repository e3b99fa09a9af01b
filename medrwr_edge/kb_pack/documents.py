"""What goes into a knowledge pack: one `Document` per retrievable unit.

Text packs: `text` is what is embedded, indexed lexically and spliced into `<retrieve>` blocks.
Image packs: `image_path` is the source image (PNG/JPEG/DICOM) that is embedded and copied into the pack as
PNG; `caption` is what CDIR splices into the assistant turn; `text` repeats the caption for lexical search.
`embed_text`, when set, is what the dense encoder embeds instead of `text` (e.g. an ICD-10-CM entry's code,
description and inclusion terms without its long excludes lists: a small embedder blurs a long passage, and
embedding the short header is several times faster); the full `text` is still indexed lexically and retrieved.
`metadata` holds small, non-identifying facts (code, chapter, modality, body region...). Never patient identifiers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str = ""
    title: str = ""
    image_path: Optional[str] = None
    caption: Optional[str] = None
    metadata: dict = field(default_factory=dict, hash=False, compare=False)
    embed_text: Optional[str] = None
