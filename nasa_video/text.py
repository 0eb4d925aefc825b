"""Prompt encoding as Wan does it: fixed length, and embeddings past the prompt's length set to zero
(so padding reaches the text-embedding MLP as zeros; cross-attention attends to all positions, no mask)."""
from __future__ import annotations

import torch

from .errors import UserError


class TextEncoder:
    """A tokenizer and an encoder (umT5 for Wan; any model whose output has last_hidden_state)."""

    def __init__(self, tokenizer, encoder, max_length: int):
        self.tokenizer = tokenizer
        self.encoder = encoder.eval().requires_grad_(False)
        self.max_length = max_length
        self._memo: dict[str, torch.Tensor] = {}

    @property
    def device(self):
        return next(self.encoder.parameters()).device

    def token_count(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def readable_tokens(self, prompt: str) -> int:
        """Tokens of the prompt that carry text (not padding, end or unknown): 0 means it encodes to nothing."""
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        import warnings

        with warnings.catch_warnings():  # the encode that follows names unknown words; once is enough
            warnings.simplefilter("ignore")
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return sum(1 for i in ids if i not in special)

    def check_readable(self, prompt: str, what: str = "prompt") -> None:
        if self.readable_tokens(prompt) == 0:
            raise UserError(f"the {what} {prompt[:40]!r} has no word the text encoder can read: "
                            f"it would encode to nothing; rephrase it")

    def encode_batch(self, prompts: list[str]) -> torch.Tensor:
        """[B, max_length, dim] float32, differentiable when grad is enabled (training the toy encoder)."""
        for prompt in prompts:
            count = self.token_count(prompt)
            if count > self.max_length:
                raise UserError(f"prompt is {count} tokens but the text encoder takes at most {self.max_length}; "
                                f"shorten it: {prompt[:60]!r}...")
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return hidden * mask[..., None].to(hidden.dtype)

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        """[1, max_length, dim] float32. Memoised: a prompt reused between blocks or videos is encoded once."""
        if prompt not in self._memo:
            if len(self._memo) > 64:
                self._memo.clear()
            self._memo[prompt] = self.encode_batch([prompt])
        return self._memo[prompt]
