"""Teacher forcing for real-model tests: make a model that knows no Med-RwR protocol query or answer on cue."""

from __future__ import annotations

import numpy as np

from medrwr_edge.runtime.backend import Generation, GeneratedToken


class ForcedPasses:
    """Wraps a real backend: for chosen passes, the given text is decoded through the real model (teacher
    forcing) instead of sampled. SmolLM2-135M was never trained on the Med-RwR protocol, so this is how a test
    makes a real model query or answer at a known point. A forced `<answer> X` gets the probability the real
    model gives X after `<answer>` (read from its logits), which is exactly the loop's confidence. Text that
    does not end in a stop string is continued by the model itself."""

    def __init__(self, backend, forced: dict[int, str]):
        self.inner, self.forced, self.calls = backend, forced, 0
        # Forced this way the model follows the protocol: `protocol="auto"` runs it native, as these tests intend.
        backend.info.declares_protocol = True

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, settings, stop, on_piece=None):
        text = self.forced.get(self.calls)
        self.calls += 1
        if text is None:
            return self.inner.generate(settings, stop, on_piece)
        tokens = []
        if "<answer>" in text and text.split("<answer>", 1)[1].strip():
            head, answer = text.split("<answer>", 1)
            head += "<answer>"
            self.inner.append_text(head)
            tokens.append(GeneratedToken(-1, head, 1.0))
            logits = self.inner.last_logits().astype(np.float64)
            first = answer.split("</answer>")[0].rstrip()
            token_id = self.inner.tokenize(first)[0]
            prob = float(np.exp(logits[token_id] - logits.max()) / np.exp(logits - logits.max()).sum())
            self.inner.append_text(answer)
            tokens.append(GeneratedToken(token_id, first, prob))
            tokens.append(GeneratedToken(-1, answer[len(first):], 1.0))
        else:
            self.inner.append_text(text)
            tokens.append(GeneratedToken(-1, text, 1.0))
        stop_string = next((s for s in stop if text.endswith(s)), None)
        return Generation(text, tokens, "stop" if stop_string else "eos", stop_string)
