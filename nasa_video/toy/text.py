"""The bundled world's text side: a word-level tokenizer over the world's vocabulary and a tiny umT5-style
encoder (the same UMT5EncoderModel class as Wan's text encoder, at toy size), padded like Wan's: fixed
length, and positions past the prompt zeroed by nasa_video.text.TextEncoder."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from ..text import TextEncoder
from .world import COLORS, MOTIONS, OBJECTS, SHAPES

SPECIALS = ["<pad>", "</s>", "<unk>"]
_WORD = re.compile(r"[^\s!-/:-@\[-`{-~]+")  # split on whitespace and ASCII punctuation
# The words, then each colour-shape pair as one token ("red circle"), merged the way BPE merges a frequent pair:
# a two-layer encoder trained for 20 minutes on a CPU does not learn which shape word belongs to which colour word
# (with words only, the teacher drew the named shape for 48% of objects; with the pairs, 97%), and the benchmark
# measures guidance, not binding. A vocabulary without pairs (older weights) tokenizes word by word as before.
VOCAB = SPECIALS + ["a", "and", "moving"] + list(COLORS) + list(SHAPES) + list(MOTIONS) + OBJECTS


class WordTokenizer:
    """Lower-cased words -> ids; </s> appended as umT5 does. An unknown word becomes <unk> and is named in a
    warning, never dropped silently."""

    def __init__(self, vocab: list[str]):
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pairs = {w for w in self.vocab if " " in w}  # merged two-word tokens; none in older vocabularies

    def words(self, text: str) -> list[str]:
        """The text's tokens as strings: its words, each adjacent pair that is itself a token merged into one."""
        words, out = _WORD.findall(text.lower()), []
        i = 0
        while i < len(words):
            pair = " ".join(words[i:i + 2])
            if pair in self.pairs:
                out.append(pair)
                i += 2
            else:
                out.append(words[i])
                i += 1
        return out

    all_special_ids = [0, 1, 2]  # <pad>, </s>, <unk>: tokens that carry no word

    def ids(self, text: str, warn: bool = True) -> list[int]:
        # Words are runs of anything but whitespace and ASCII punctuation, so "carré", "猫" and "🔴" are words
        # (unknown ones, named below), never silently cut down or dropped.
        words = self.words(text)
        unknown = list(dict.fromkeys(w for w in words if w not in self.index))
        if unknown and warn:
            shown = ", ".join(repr(w if len(w) <= 24 else w[:24] + "...") for w in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            warnings.warn(f"the bundled text encoder does not know {shown}{more}; "
                          f"known words: {' '.join(w for w in self.vocab[3:] if ' ' not in w)}", stacklevel=3)
        if warn and words and not unknown and not any(w in SHAPES or w in self.pairs for w in words):
            warnings.warn(f"{text[:40]!r} names no shape ({', '.join(SHAPES)}): as a prompt the bundled world "
                          f"draws nothing for it (as a negative it names every object of that colour)", stacklevel=3)
        if warn and "moving" in words[:-2]:
            warnings.warn("the bundled world moves a whole scene: name its motion once, at the end "
                          "(\"a red circle and a blue square moving up\")", stacklevel=3)
        return [self.index.get(w, self.index["<unk>"]) for w in words] + [self.index["</s>"]]

    def __call__(self, texts, padding=None, max_length=None, truncation=False, add_special_tokens=True,
                 return_tensors=None):
        single = isinstance(texts, str)
        # Warn once per encoding: the length check (no padding) tokenizes too.
        rows = [self.ids(t, warn=padding == "max_length") for t in ([texts] if single else texts)]
        if truncation and max_length:
            rows = [r[:max_length] for r in rows]
        if padding == "max_length":
            masks = [[1] * len(r) + [0] * (max_length - len(r)) for r in rows]
            rows = [r + [0] * (max_length - len(r)) for r in rows]
        else:
            masks = [[1] * len(r) for r in rows]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks)}
        if single:
            return {"input_ids": rows[0], "attention_mask": masks[0]}
        return {"input_ids": rows, "attention_mask": masks}

    def save(self, folder: Path) -> None:
        (Path(folder) / "vocab.json").write_text(json.dumps(self.vocab))


def new_toy_text_encoder(config: dict, max_length: int, seed: int) -> TextEncoder:
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(VOCAB), pad_token_id=0, eos_token_id=1, **config))
    return TextEncoder(WordTokenizer(VOCAB), encoder, max_length)


def save_toy_text_encoder(text: TextEncoder, folder: Path) -> None:
    folder = Path(folder)
    text.encoder.save_pretrained(folder, safe_serialization=True)
    text.tokenizer.save(folder)
    (folder / "max_length.json").write_text(json.dumps(text.max_length))


def load_toy_text_encoder(folder: Path, device) -> TextEncoder:
    from transformers import UMT5EncoderModel
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    hf_logging.disable_progress_bar()
    encoder = UMT5EncoderModel.from_pretrained(folder).to(device)
    vocab = json.loads((folder / "vocab.json").read_text())
    return TextEncoder(WordTokenizer(vocab), encoder, json.loads((folder / "max_length.json").read_text()))
