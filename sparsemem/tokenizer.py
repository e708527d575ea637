"""A thin tokenizer over a Hugging Face `tokenizer.json` (the `tokenizers` library, no torch).

Special tokens are handled here, not by the file's post-processor, so every family
behaves the same: `encode(text)` gives the text's ids with BOS prepended when asked.
"""

from __future__ import annotations

import os
from typing import Sequence

import tokenizers


class Tokenizer:
    """Encode/decode text with a `tokenizer.json`, adding BOS explicitly."""

    def __init__(self, path: str | os.PathLike, *, bos_id: int | None, eos_id: int, pad_id: int):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Tokenizer file {os.fspath(path)!r} not found; expected a Hugging Face "
                                    "tokenizer.json next to the model's config.json")
        self._tok = tokenizers.Tokenizer.from_file(os.fspath(path))
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        return self.encode_batch([text], add_bos=add_bos)[0]

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = True) -> list[list[int]]:
        prefix = [self.bos_id] if add_bos and self.bos_id is not None else []
        return [prefix + enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
