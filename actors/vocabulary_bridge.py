"""Token ids of one byte-level BPE vocabulary read as another's: the bridge a foreign-vocabulary drafter drafts across.

Both vocabularies spell every token as bytes (byte-level BPE: GPT-2's alphabet maps each
byte to one printable character), so text moves between them exactly: ids -> bytes -> the
other tokenizer's ids. What crosses is therefore always text, never a guess at an id.

- `Vocabulary`: one tokenizer's byte spelling of every id, and its encoder.
- `VocabularyBridge`: a drafter's vocabulary beside its target's; the *intersection*
  (drafter ids whose bytes are exactly one target token, the end-of-sequence token matched
  by name) with its id map, and the re-tokenising of drafted text into target ids.
- `BridgedContext`: one sequence's committed text as the drafter's ids, kept canonical at
  each commit by re-tokenising the last few drafter tokens together with the new text.
"""

from dataclasses import dataclass, field
from functools import cache

import torch
from transformers import PreTrainedTokenizerBase

from actors.errors import IncompatibleModels

SPELLING_CHECK = "def f(x):\n\t return 'Ünïcödé ✓ 数'  # <|endoftext|>"  # ids must spell back to the same bytes
LOOKBEHIND_TOKENS = 4
CONTINUATION_BYTES = bytes(range(0x80, 0xC0))  # UTF-8's second to fourth bytes of a character  # drafter tokens re-tokenised with each commit's new text: a word split across rounds rejoins


@cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character each byte is spelled with -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars)}


class Vocabulary:
    """One byte-level BPE tokenizer: the bytes of every id, its end-of-sequence id, and an encoder."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or type(backend.decoder).__name__ != "ByteLevel":
            raise IncompatibleModels("drafting across vocabularies needs byte-level BPE tokenizers on both sides")
        self._backend = backend
        self.size = len(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.special = {token.content: i for i, token in backend.get_added_tokens_decoder().items() if token.special}
        byte_of = _byte_of_char()
        pieces = tokenizer.convert_ids_to_tokens(list(range(self.size)))
        self.bytes_of: list[bytes] = [b"" if i in self.special.values() else bytes(byte_of[c] for c in piece)
                                      for i, piece in enumerate(pieces)]
        self.byte_ids = {spelling[0]: i for i, spelling in enumerate(self.bytes_of) if len(spelling) == 1}  # byte -> id
        if len(self.byte_ids) < 256 or self.spell(self.encode(SPELLING_CHECK)) != SPELLING_CHECK.encode():
            raise IncompatibleModels("a tokenizer that changes text (a normaliser) cannot draft across vocabularies")

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, nothing added; a special token's name inside the text is encoded as text."""
        self._backend.encode_special_tokens = True
        try:
            return self._backend.encode(text, add_special_tokens=False).ids
        finally:
            self._backend.encode_special_tokens = False

    def spell(self, ids: list[int]) -> bytes:
        return b"".join(self.bytes_of[i] for i in ids)


def complete_text(data: bytes) -> tuple[str, int]:
    """The longest prefix of `data` that is whole UTF-8 characters, decoded, and its length in bytes.

    A byte-level token may end inside a character; the rest of it arrives with the next token.
    """
    for cut in range(len(data), max(-1, len(data) - 4), -1):
        try:
            return data[:cut].decode("utf-8"), cut
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="replace"), len(data)  # not UTF-8 at all: tokenisers see it replaced


class VocabularyBridge:
    """A drafter's vocabulary beside its target's."""

    def __init__(self, target: Vocabulary, drafter: Vocabulary):
        self.target, self.drafter = target, drafter
        target_id_of = {spelling: i for i, spelling in enumerate(target.bytes_of) if spelling}
        pairs = [(d, target_id_of[spelling]) for d, spelling in enumerate(drafter.bytes_of) if spelling in target_id_of]
        pairs += [(d, target.special[name]) for name, d in drafter.special.items() if name in target.special]
        pairs.sort()
        self.to_target: dict[int, int] = dict(pairs)
        self.shared_drafter_ids = tuple(d for d, _ in pairs)  # the intersection, as drafter ids (ascending)
        self._shared = torch.tensor(pairs, dtype=torch.long).T  # [2, I]: drafter ids, then their target ids

    def retokenize(self, draft: list[int], carried: bytes = b"") -> list[int]:
        """Target ids of the text drafted by drafter ids `draft` (String-Level Exact Match).

        `carried`: bytes the target has emitted that the drafter's context does not hold yet
        (part of a character); the draft must begin with them, and they are not drafted again.
        A drafted end-of-sequence token ends the text and becomes the target's.
        """
        eos_at = next((i for i, d in enumerate(draft) if d == self.drafter.eos_id), None)
        spelled = self.drafter.spell(draft[:eos_at])
        if not spelled.startswith(carried):
            return []
        rest = spelled[len(carried):]
        orphans = len(rest) - len(rest.lstrip(CONTINUATION_BYTES))  # the rest of a character the target began
        text, whole = complete_text(rest[orphans:])
        ids = [self.target.byte_ids[byte] for byte in rest[:orphans]] + self.target.encode(text)
        whole += orphans
        if eos_at is not None and whole == len(spelled) - len(carried) and self.target.eos_id is not None:
            ids.append(self.target.eos_id)
        return ids

    def target_probs(self, q: torch.Tensor) -> torch.Tensor:
        """q [m, V_drafter], zero outside the intersection -> the same distributions over target ids [m, V_target]."""
        mapped = q.new_zeros(q.shape[0], self.target.size)  # [m, V_target]
        mapped[:, self._shared[1]] = q[:, self._shared[0]]
        return mapped


@dataclass
class BridgedContext:
    """One sequence's committed text, and the same text as the drafter's ids (its context there)."""

    bridge: VocabularyBridge
    text: bytearray = field(default_factory=bytearray)  # every committed byte, prompt included
    ids: list[int] = field(default_factory=list)  # the drafter's ids of text[:covered]
    ends: list[int] = field(default_factory=list)  # ends[i]: bytes of text covered by ids[: i + 1]

    @property
    def covered(self) -> int:
        return self.ends[-1] if self.ends else 0

    @property
    def carried(self) -> bytes:
        """Committed bytes beyond the drafter's ids: part of a character whose rest has not arrived."""
        return bytes(self.text[self.covered :])

    def append(self, target_ids: list[int]) -> tuple[int, list[int]]:
        """Add the text of `target_ids`; returns (rewind, ids): drop the drafter context's last `rewind` ids, then
        append `ids`. The last `LOOKBEHIND_TOKENS` ids are re-tokenised with the new text, so that the drafter
        reads a word the rounds split as it would have been tokenised whole."""
        self.text += self.bridge.target.spell(target_ids)
        back = max(0, len(self.ids) - LOOKBEHIND_TOKENS)
        start = self.ends[back - 1] if back else 0
        text, _ = complete_text(bytes(self.text[start:]))
        tail = self.bridge.drafter.encode(text)
        old_tail = self.ids[back:]
        same = 0
        while same < min(len(tail), len(old_tail)) and tail[same] == old_tail[same]:
            same += 1
        rewind, added = len(old_tail) - same, tail[same:]
        del self.ids[back + same :], self.ends[back + same :]
        offset = self.ends[-1] if self.ends else 0
        for token in added:
            offset += len(self.bridge.drafter.bytes_of[token])
            self.ids.append(token)
            self.ends.append(offset)
        return rewind, added
