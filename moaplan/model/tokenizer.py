"""The reference model's byte-level tokenizer: token id ``b`` is byte ``b``, plus bos/eos/pad.

Built in code from the ``tokenizers`` library, so it needs no download; saved as
``tokenizer.json`` it loads with ``AutoTokenizer.from_pretrained`` like any other tokenizer.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what the ByteLevel pre-tokenizer
    emits), so that a vocabulary keyed by these characters maps byte ``b`` to id ``b``."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in mapping)
    mapping.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return mapping


def byte_tokenizer(model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """A fresh byte-level tokenizer that prepends ``<s>`` to every encoded text."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab.update({BOS: BOS_ID, EOS: EOS_ID, PAD: PAD_ID})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, PAD])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
    )
