"""A CLIP tokenizer written from local files: the released layout (`vocab.json`, `merges.txt`,
`tokenizer_config.json`), with a vocabulary of the 256 byte symbols, their end-of-word forms and whole words.

Tiny text-to-image pipelines and CLIP models for tests and smoke runs use it: nothing is fetched from the Hub,
and the files are read back by transformers' own `CLIPTokenizer.from_pretrained`, as a released one is.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

from transformers.convert_slow_tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORD = re.compile(r"[a-z]+")


def _word_merges(word: str) -> list[tuple[str, str]]:
    """The merges that build `word</w>` left to right: w·o, wo·r, wor·d</w>."""
    pieces, merges = list(word[:-1]) + [word[-1] + "</w>"], []
    left = pieces[0]
    for right in pieces[1:]:
        merges.append((left, right))
        left = left + right
    return merges


def write_clip_tokenizer(folder: str, words: Iterable[str] = (), max_length: int = 77) -> str:
    """Write a CLIP BPE tokenizer into `folder` that knows every byte and each of `words` (lower-cased letters)
    as one token; `max_length`: its model_max_length (CLIP's context length). Returns `folder`."""
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges: list[tuple[str, str]] = []
    for word in sorted({w for text in words for w in WORD.findall(text.lower())}):
        for left, right in _word_merges(word):
            if (left, right) not in merges:
                merges.append((left, right))
                vocab.setdefault(left + right, len(vocab))
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": int(max_length), "bos_token": BOS,
                   "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, f)
    return folder
