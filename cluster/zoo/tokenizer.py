"""The byte-level BPE tokenizer shared by every model of the zoo, saved in Hugging Face format."""

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from cluster.zoo.config import EOS_TOKEN, TokenizerSettings


def train_tokenizer(texts: Iterable[str], settings: TokenizerSettings) -> PreTrainedTokenizerFast:
    """Byte-level BPE: every byte is in the alphabet, so any text round-trips exactly.

    The eos token doubles as bos and pad; nothing is added automatically when encoding.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings.vocab_size,
        min_frequency=settings.min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(path)


def encode_documents(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """All texts as one stream of token ids, each document followed by eos: LongTensor[N].

    A literal "<|endoftext|>" inside a document is encoded as text, so eos only ever separates documents.
    """
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = True
    try:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
    finally:
        backend.encode_special_tokens = False
    ids: list[int] = []
    for encoding in encodings:
        ids += encoding.ids
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)
