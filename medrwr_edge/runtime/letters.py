"""Reading an option letter as the model itself would write it.

After `<answer>` a model writes the letter as " C" — one token in the Qwen and SmolLM vocabularies — so the letter's
probability is that token's probability at the answer position. Forcing `"<answer> "` and then reading "C" would
split the tokens differently from how the model writes its answer and confound the read-out (issue 22).
"""

from __future__ import annotations

from typing import Optional, Sequence


def letter_token_ids(backend, letters: Sequence[str]) -> Optional[list[int]]:
    """The token of " X" for each letter, or None when one is not a single token or two coincide."""
    ids = []
    for letter in letters:
        toks = backend.tokenize(" " + letter)
        if len(toks) != 1:
            return None
        ids.append(toks[0])
    return ids if len(set(ids)) == len(ids) else None


def letter_probs(backend, letters: Sequence[str]) -> Optional[dict[str, float]]:
    """{letter: probability of " letter" at the next position} from the model's unconstrained distribution (softmax
    at temperature 1, the number the paper's confidence is), or None when the backend cannot say."""
    read = getattr(backend, "next_token_probs", None)
    ids = letter_token_ids(backend, letters) if read is not None else None
    if ids is None:
        return None
    try:
        probs = read(ids)
    except AttributeError:  # a backend that declares the method but has no distribution (scripted, unset)
        return None
    return dict(zip(letters, (float(p) for p in probs)))
