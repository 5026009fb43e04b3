"""Streaming detokenization: new text per round without re-decoding the whole completion.

Byte-level BPE splits some characters across tokens, so decoding tokens one by
one can end in half a character (U+FFFD). Each step decodes only a short window
of recent tokens (from `_prefix` on) and emits what the new tokens added, holding
back text that ends in half a character until the next tokens complete it.
Cost per step is the window, not the whole completion (after vLLM's and TGI's
incremental detokenizers).
"""

REPLACEMENT_CHARACTER = "\ufffd"


class TextStream:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._prefix = 0  # window start: tokens before it are already emitted as text
        self._read = 0  # tokens up to here are emitted as text

    def add(self, new_tokens: list[int], final: bool = False) -> str:
        """Append tokens; return the text they complete (all remaining text when `final`)."""
        self.tokens.extend(new_tokens)
        emitted = self._decode(self._prefix, self._read)
        current = self._decode(self._prefix, len(self.tokens))
        if current.endswith(REPLACEMENT_CHARACTER) and not final:
            return ""  # wait for the rest of the character
        self._prefix, self._read = self._read, len(self.tokens)
        return current[len(emitted):]

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.tokens[start:end]) if end > start else ""
