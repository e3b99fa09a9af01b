"""Knowledge packs as the loop's retrievers.

Several text packs may be searched for one query: each is searched on its own (its scores mean nothing next to
another pack's), then hits are interleaved by rank (1st of each pack, then 2nd, ...) and the top k kept.
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..evidence.record import RetrievedDoc
from ..imaging import load_image
from .backend import ImageInput
from .loop import ReferenceImage


class PackTextRetriever:
    def __init__(self, packs: Sequence, mode: Optional[str] = None):
        self.packs = list(packs)
        self.mode = mode

    def search(self, query: str, k: int) -> list[RetrievedDoc]:
        per_pack = []
        for pack in self.packs:
            hits = pack.search(query, k=min(k, pack.doc_count), mode=self._mode_for(pack))
            per_pack.append([_doc(pack, h) for h in hits])
        merged, seen = [], set()
        for rank in range(k):
            for docs in per_pack:
                if rank < len(docs) and (docs[rank].pack, docs[rank].doc_id) not in seen:
                    seen.add((docs[rank].pack, docs[rank].doc_id))
                    merged.append(docs[rank])
        return merged[:k]

    def _mode_for(self, pack) -> Optional[str]:
        return self.mode if pack.kind == "text" else "lexical"


def _doc(pack, hit) -> RetrievedDoc:
    return RetrievedDoc(
        pack=pack.name,
        pack_version=pack.version,
        doc_id=hit.doc_id,
        score=round(float(hit.score), 6),
        snippet=hit.text,
        source=hit.source,
        ranks=dict(hit.ranks),
        mode=hit.mode,
    )


# A reference this close (cosine) is the input image itself (or a copy): it adds nothing, and its caption would
# simply describe the input. CDIR takes the next one.
SAME_IMAGE_SIMILARITY = 0.999


class PackImageRetriever:
    """CDIR: the most similar reference image (dense search in the image encoder's space), its caption and its
    pixels (`ReferenceImage.image`, for a backend that can see them)."""

    def __init__(self, pack):
        self.pack = pack

    def nearest(self, image: ImageInput) -> Optional[ReferenceImage]:
        if image.pixels is None:
            return None
        hits = self.pack.search(image, k=min(3, self.pack.doc_count))
        hit = next((h for h in hits if h.score < SAME_IMAGE_SIMILARITY), None)
        if hit is None:
            return None
        image = None
        if hit.image_path:
            # The pack's PNG copy (its thumbnail): the pixels a vision model is shown (CDIR as in the paper), read
            # through the same loader as any input image, so the sha256 is of exactly those bytes.
            loaded = load_image(hit.image_path)
            image = ImageInput(loaded.pixels, loaded.sha256, role="reference")
        return ReferenceImage(
            pack=self.pack.name,
            pack_version=self.pack.version,
            doc_id=hit.doc_id,
            caption=hit.caption or hit.text,
            score=round(float(hit.score), 6),
            image_sha256=image.sha256 if image is not None else "",
            image=image,
        )
