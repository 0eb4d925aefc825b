"""The processor installed on every cross-attention layer (attn2) of a generator: the layer's text K/V and the
guidance setting, turned into the guided attention output. It belongs beside the model (a generator calls it
from its blocks); the methods it runs are guidance.py's."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..guidance import AttentionPlan, Guidance, NoGuidance, RowsGuidance, TextKV, merge_text_kv


@dataclass
class GuidanceSetting:
    """The method and its per-negative alphas for the current pass; shared by every layer's processor."""

    method: Guidance
    alphas: tuple[float, ...] = ()


class CrossAttentionProcessor:
    """The processor installed on each block's cross-attention (attn2), as diffusers installs its attention
    processors: it holds that layer's text K/V (positive + weighted negatives) and the guidance setting, and
    computes the guided attention. A TextCache owns one per layer (generator.set_text installs them); the
    cache pass, CFG's two passes and the upstream hook all go through these objects.

    text None: the K/V are built inside the block's forward from the projected prompt contexts it is handed
    (training under FSDP, where a block's weights exist only inside its forward)."""

    def __init__(self, text: TextKV | None, setting: GuidanceSetting):
        self.text, self.setting = text, setting
        self.plan: AttentionPlan | None = None
        self._plan_key: tuple | None = None

    def __deepcopy__(self, memo):
        # A copied network (EMA, critic) gets no text: the K/V belong to a TextCache, and may hold a graph. Nor the
        # block loop's per-row setting, which belongs to the forward of a batch of videos.
        setting = self.setting
        if isinstance(setting.method, RowsGuidance):
            return CrossAttentionProcessor(None, GuidanceSetting(NoGuidance()))
        return CrossAttentionProcessor(None, GuidanceSetting(setting.method, setting.alphas))

    def prepare(self) -> AttentionPlan | None:
        """The plan for the current text and setting, rebuilt only when either changed (a new alpha rescales the
        negative V once, not at every forward). The generator calls this before its blocks, outside any
        compiled region, so the compiled code reads only the plan's tensors."""
        if self.text is None:
            return None
        setting = self.setting
        key = (id(self.text), id(setting.method), setting.alphas)
        if key != self._plan_key:
            self.plan, self._plan_key = setting.method.prepare(self.text, setting.alphas), key
        return self.plan

    def attend(self, q: torch.Tensor, text: TextKV | None = None) -> torch.Tensor:
        """The guided attention output [B, S, H, D] of query q [B, S, H, D] (before the output projection)."""
        return self.setting.method.cross_attention(q, self.text if text is None else text, self.setting.alphas)

    def __call__(self, attn, hidden: torch.Tensor, contexts=None) -> torch.Tensor:
        """attn: diffusers' attention module (to_q, to_k, to_v, norm_q, norm_k, to_out, heads);
        hidden [B, S, dim] -> [B, S, dim]. contexts: (projected prompt contexts, positive first; lengths)."""
        heads = attn.heads
        q = attn.norm_q(attn.to_q(hidden)).unflatten(2, (heads, -1))
        if contexts is not None:  # text K/V built inside the forward (training): no plan to keep
            projected, lengths = contexts
            kvs = [text_kv(attn, c) for c in projected]
            out = self.attend(q, merge_text_kv(kvs[0], kvs[1:], heads, lengths))
        else:
            # Eager: check the plan is current (cheap). Compiled: the generator prepared it before its blocks;
            # checking here would make the compiled code guard on the alpha values.
            plan = self.plan if torch.compiler.is_compiling() else self.prepare()
            if plan is None:
                raise RuntimeError("no text K/V: install a TextCache with generator.set_text(), or pass prompts=")
            out = plan(q)
        return attn.to_out[0](out.flatten(2))


def text_kv(attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One cross-attention layer's (K, V) [B, L, H, D] of projected text [B, L, dim]; norm_k applied."""
    heads = attn.heads
    return attn.norm_k(attn.to_k(context)).unflatten(2, (heads, -1)), attn.to_v(context).unflatten(2, (heads, -1))


def plain_processors(count: int, method: Guidance | None = None, alphas=()) -> list[CrossAttentionProcessor]:
    """Text-less processors sharing one setting (for a forward handed prompt embeddings)."""
    setting = GuidanceSetting(method or NoGuidance(), tuple(alphas))
    return [CrossAttentionProcessor(None, setting) for _ in range(count)]
