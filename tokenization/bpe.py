"""Train a byte-level BPE on the corpus when the user brings no tokenizer.

The result is saved as a Hugging Face tokenizer folder and loaded back through AutoTokenizer,
so a trained tokenizer and a downloaded one go through the same code path afterwards.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from . import PrepareError

EOS = "<|endoftext|>"


def train_bpe(documents: Iterable[str], vocab_size: int, out_dir: Path, length: int | None = None) -> None:
    """Train a GPT-2 style byte-level BPE (lossless on any UTF-8 text) and save it to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise PrepareError(f"--vocab_size {vocab_size} is too small: a byte-level BPE needs at least {len(alphabet) + 2}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(documents, trainer=trainer, length=length)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    fast.save_pretrained(str(out_dir))
