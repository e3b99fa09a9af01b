"""Searching a patient's history beside the knowledge packs, for the Med-RwR loop.

The knowledge packs are merged as before (runtime/retrieval.py: round-robin by rank). Round-robin alone would
starve the history: with two knowledge packs its best passage is third, with three it never makes the top 3. So
the history gets ONE RESERVED SLOT: its best passage goes first in the `<retrieve>` block when it is relevant to
the query, and the knowledge packs fill the remaining k-1 slots (history passages fill any slot the knowledge packs
leave empty). First, because the patient's own record is the most specific evidence there is and the model reads
"(1) Patient history (date): ..." before the general references.

"Relevant" (a floor, so a query about something else does not splice a random note into the turn): dense cosine
similarity to the query of at least DENSE_FLOOR, or at least LEXICAL_FLOOR when BM25 also matched a query word.
BM25 alone is not enough: "ICD-10 code for acute appendicitis" matches "Lisinopril 10 mg" on the token "10".
Measured with MiniLM on a three-paragraph COPD history: related queries ("lung nodule follow-up", "What inhalers
does the patient use?", "hypertension treatment", "emphysema") score 0.44-0.60 on the right passage; unrelated ones
("ICD-10 code for acute appendicitis", "fracture of the distal radius", "J44.9", "diabetic eye disease") score
at most 0.20; "subarachnoid hemorrhage head CT" reaches 0.36 on the chest-CT passage (shared "CT") and passes the
lexical floor, a borderline case that is arguably relevant imaging history. tests/test_history.py pins both sides.

Every returned document's `source` says where it came from: "history" or "knowledge:<pack name>".
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..evidence.record import RetrievedDoc
from .store import SOURCE, snippet_text

DENSE_FLOOR = 0.40
LEXICAL_FLOOR = 0.30
DENSE_DEPTH = 50  # cosines are read for this many nearest passages; farther ones are below any useful floor


class HistoryAwareRetriever:
    def __init__(self, knowledge, history_pack, mode: Optional[str] = None, dense_floor: float = DENSE_FLOOR):
        self.knowledge = knowledge  # a runtime.retrieval.PackTextRetriever, or None
        self.history = history_pack
        self.mode = mode
        self.dense_floor = dense_floor

    def search(self, query: str, k: int) -> list[RetrievedDoc]:
        knowledge = [dataclasses.replace(d, source=f"knowledge:{d.pack}")
                     for d in (self.knowledge.search(query, k) if self.knowledge is not None else [])]
        history = self.history_docs(query, k)
        if not history:
            return knowledge[:k]
        merged = history[:1] + knowledge[: k - 1]
        merged += history[1 : 1 + k - len(merged)]
        return merged[:k]

    def history_docs(self, query: str, k: int) -> list[RetrievedDoc]:
        """The history's top-k passages that pass the relevance floor, best first."""
        pack = self.history
        cosine = {h.doc_id: h.score for h in pack.search(query, k=min(DENSE_DEPTH, pack.doc_count), mode="dense")}
        hits = pack.search(query, k=min(k, pack.doc_count), mode=self.mode)
        out = []
        for h in hits:
            lexical_match = h.ranks.get("lexical") is not None or h.ranks.get("exact") is not None
            floor = min(self.dense_floor, LEXICAL_FLOOR) if lexical_match else self.dense_floor
            if cosine.get(h.doc_id, -1.0) < floor:
                continue
            snippet = snippet_text(h.text, h.metadata.get("date"))
            out.append(RetrievedDoc(pack=pack.name, pack_version=pack.version, doc_id=h.doc_id,
                                    score=round(float(h.score), 6), snippet=snippet, source=SOURCE,
                                    ranks=dict(h.ranks), mode=h.mode))
        return out
