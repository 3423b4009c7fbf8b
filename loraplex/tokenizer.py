"""HF tokenizer wrapper: encoding, chat templates, incremental UTF-8-safe detokenization."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_CONTEXT_TOKENS = 6  # prompt tokens kept as decoding context (spacing rules of some tokenizers)


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(path))
        self.vocab_size = len(self.hf)
        eos = self.hf.eos_token_id
        self.eos_token_ids: tuple[int, ...] = () if eos is None else (int(eos),)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template; use completions")
        return self.hf.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt, **kwargs)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        # The template already places special tokens (BOS etc.): do not add them twice.
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character.

    Decodes the window [prefix_offset:] and compares it with [prefix_offset:read_offset]: the
    difference is new text, released only when it does not end in U+FFFD (an incomplete byte
    sequence that the next token will complete).
    """

    __slots__ = ("_ids", "_prefix_offset", "_read_offset", "_skip", "_tok")

    def __init__(self, tok: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self._tok = tok
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, token_ids: list[int]) -> str:
        self._ids.extend(token_ids)
        prefix = self._tok.decode(self._ids[self._prefix_offset:self._read_offset], self._skip)
        full = self._tok.decode(self._ids[self._prefix_offset:], self._skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """At the end of a sequence: release whatever is left, replacement chars included."""
        prefix = self._tok.decode(self._ids[self._prefix_offset:self._read_offset], self._skip)
        full = self._tok.decode(self._ids[self._prefix_offset:], self._skip)
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""
