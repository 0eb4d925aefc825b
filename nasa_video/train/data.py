"""Training data: clips on disk (one safetensors file each, read lazily) and drawing a batch."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import UserError


class ClipFolder:
    """Training clips as one safetensors file each: one tensor (DMD: "latents" [C, F, h, w], the generator's
    standardised latents; ODE: "trajectory" [S + 1, C, F, h, w]) and the caption in the file's metadata
    {"caption": ...}. Read lazily, a batch at a time."""

    def __init__(self, folder: str | os.PathLike, tensor: str = "latents"):
        if not folder or not Path(folder).is_dir():
            raise UserError(f"clip folder {folder!r} does not exist: set it in the training YAML's data: section")
        self.files, self.tensor = sorted(Path(folder).glob("*.safetensors")), tensor
        if not self.files:
            raise UserError(f"no *.safetensors clips in {folder} (each: tensor {tensor!r}, metadata {{'caption': ...}})")
        self.shape = self._read(0)[0].shape

    def _read(self, i: int):
        from safetensors import safe_open

        with safe_open(str(self.files[i]), "pt") as f:
            if self.tensor not in f.keys():
                raise UserError(f"{self.files[i]} has no tensor {self.tensor!r} (has {sorted(f.keys())})")
            return f.get_tensor(self.tensor).float(), (f.metadata() or {}).get("caption", "")

    def __len__(self) -> int:
        return len(self.files)

    def check_captions(self, text) -> None:
        """Every caption within the text encoder's limit, found before training rather than on one rank mid-run."""
        from safetensors import safe_open

        for file in self.files:
            with safe_open(str(file), "pt") as f:
                caption = (f.metadata() or {}).get("caption", "")
            if text.token_count(caption) > text.max_length:
                raise UserError(f"{file}: its caption is {text.token_count(caption)} tokens, over the text encoder's "
                                f"{text.max_length}; shorten it")

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, list[str]]:
        items = [self._read(i) for i in indices]
        return torch.stack([x for x, _ in items]), [c for _, c in items]



def draw_batch(data, captions: list[str], batch: int, rng: torch.Generator, device) -> tuple[torch.Tensor, list[str]]:
    """`batch` clips and their captions, indices drawn with `rng`: from a ClipFolder (read from disk, the
    captions with the clips) or from a tensor [N, ...] beside a caption list."""
    idx = torch.randint(len(data), (batch,), generator=rng).tolist()
    if hasattr(data, "batch"):
        tensors, captions = data.batch(idx)
    else:
        tensors, captions = data[torch.tensor(idx)], [captions[i] for i in idx]
    return tensors.to(device), captions
