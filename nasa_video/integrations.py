"""Negative prompts for people running upstream CausVid or Self-Forcing: one call on their pipeline object.

    from nasa_video.integrations import enable_guidance

    pipe = InferencePipeline(config, device="cuda")          # upstream's own object, loaded as usual
    with enable_guidance(pipe, negative="blurry, low quality", scale=0.5):
        video = pipe.inference(noise, text_prompts=prompts)  # upstream's loop, caches and files untouched

The hook patches the `forward` of each cross-attention module of the upstream generator
(`pipe.generator.model.blocks[i].cross_attn`, Wan's WanT2VCrossAttention in both repositories). The
positive K/V still go through upstream's own `crossattn_cache`; the negative prompt's K/V are computed once
per layer (on the first call) and kept beside it. Z+ and Z- then come from the project's guidance methods
(NASA, NAG, VSF: the same functions as nasa-video's own generator) before the layer's output projection.
A forward pre-hook on the generator reads `t` and `current_start` of each call, so a scale schedule
(block, step) applies per block and step. Leaving the `with` block (or calling .remove()) restores the
original forwards. With scale 0 (or method "none") the original forward runs, so upstream's output is
unchanged bit for bit.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import attention  # noqa: F401  (binds guidance's kernels before anything compiles)
from .errors import UserError
from .guidance import METHODS, ScaleSchedule, make_guidance, merge_text_kv, parse_negatives, real_length
from .model.cross_attention import CrossAttentionProcessor, GuidanceSetting


def find_generator(pipeline) -> torch.nn.Module:
    """The upstream CausalWanModel inside a CausVid InferencePipeline / Self-Forcing CausalInferencePipeline
    (or the model itself)."""
    for path in (("generator", "model"), ("model",), ()):
        obj = pipeline
        for name in path:
            obj = getattr(obj, name, None)
        if obj is not None and hasattr(obj, "blocks") and hasattr(obj, "text_embedding"):
            return obj
    raise UserError("no upstream Wan generator found: pass CausVid's InferencePipeline, Self-Forcing's "
                    "CausalInferencePipeline, or their CausalWanModel (something with .blocks and .text_embedding)")


def _cross_attention_modules(model) -> list[torch.nn.Module]:
    modules = [block.cross_attn for block in model.blocks]
    for m in modules:
        for name in ("q", "k", "v", "o", "norm_q", "norm_k", "num_heads", "head_dim"):
            if not hasattr(m, name):
                raise UserError(f"upstream cross-attention {type(m).__name__} has no .{name}: this hook knows "
                                f"Wan's WanT2VCrossAttention (text-to-video) only")
    return modules


class UpstreamGuidance:
    """NASA (or NAG / VSF) inside an upstream pipeline's cross-attention. Use as a context manager."""

    def __init__(self, pipeline, negative=None, scale=0.5, method: str = "nasa",
                 negative_embeddings: torch.Tensor | Sequence[torch.Tensor] | None = None,
                 weights: Sequence[float] | None = None):
        self.pipeline = pipeline
        self.model = find_generator(pipeline)
        self.guidance = make_guidance(method)
        if not self.guidance.in_attention:
            raise UserError(f"{method} acts on the model's outputs, not in attention: the hook supports "
                            f"{', '.join(n for n, c in METHODS.items() if c.in_attention)}")
        self.modules = _cross_attention_modules(self.model)
        self.schedule = ScaleSchedule(scale)
        for value in self.schedule.values():
            self.guidance.check_scale(value)
        self._pre_hook = None
        self._negative_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        # nasa-video's own cross-attention processors, one per layer, sharing the method and the current alphas;
        # each call hands them upstream's positive K/V merged with the cached negatives.
        self.setting = GuidanceSetting(self.guidance)
        self.processors = [CrossAttentionProcessor(None, self.setting) for _ in self.modules]
        self._call = {"t": None, "start": 0}
        self.steps = self._upstream_steps()
        self.set_negative(negative, negative_embeddings, weights)

    # ---- the negative prompt --------------------------------------------------------------------------
    def set_negative(self, negative=None, embeddings=None, weights: Sequence[float] | None = None) -> None:
        """Strings are encoded with the pipeline's own text encoder; or pass prompt embeddings [L, C] / [1, L, C]
        as upstream's text encoder returns them (padding rows zero). Takes effect at the next forward."""
        if embeddings is not None:
            embeddings = [embeddings] if torch.is_tensor(embeddings) else list(embeddings)
            embeddings = [e if e.ndim == 3 else e[None] for e in embeddings]
            texts = [f"<embedding {i}>" for i in range(len(embeddings))]
            weights = list(weights) if weights is not None else [1.0] * len(embeddings)
        else:
            pairs = parse_negatives(negative)
            texts, weights = [t for t, _ in pairs], [w for _, w in pairs]
            encoder = getattr(self.pipeline, "text_encoder", None)
            if texts and encoder is None:
                raise UserError("the pipeline has no text_encoder: pass negative_embeddings instead")
            with torch.no_grad():
                embeddings = [encoder(text_prompts=[t])["prompt_embeds"] for t in texts]
        if len(weights) != len(embeddings):
            raise UserError(f"{len(weights)} weights for {len(embeddings)} negative prompts")
        self.guidance.check_negatives(len(embeddings))
        self.negative_texts, self.weights, self._embeddings = texts, list(weights), embeddings
        # real token counts (VSF drops the padding; upstream zeroes padding rows)
        self.negative_lengths = tuple(real_length(e) for e in embeddings)
        self._negative_kv = None

    def set_scale(self, scale) -> None:
        schedule = ScaleSchedule(scale)
        for value in schedule.values():
            self.guidance.check_scale(value)
        self.schedule = schedule

    def _build_negative_kv(self) -> None:
        """Per layer: the negatives' K/V, [1, L, H * N, D], norm_k applied, as upstream computes its own."""
        param = next(self.model.parameters())
        layers = []
        with torch.no_grad():
            contexts = [self._embed(e.to(param.device)) for e in self._embeddings]
            for m in self.modules:
                ks, vs = [], []
                for ctx in contexts:
                    ks.append(m.norm_k(m.k(ctx)).view(1, -1, m.num_heads, m.head_dim))
                    vs.append(m.v(ctx).view(1, -1, m.num_heads, m.head_dim))
                layers.append((torch.cat(ks, 2), torch.cat(vs, 2)))
        self._negative_kv = layers

    def _embed(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """Upstream's context path: pad to text_len with zeros, then the text-embedding MLP."""
        text_len = int(getattr(self.model, "text_len", prompt_embeds.shape[1]))
        u = prompt_embeds[0]
        if u.shape[0] < text_len:
            u = torch.cat([u, u.new_zeros(text_len - u.shape[0], u.shape[1])])
        weight = next(self.model.text_embedding.parameters())
        return self.model.text_embedding(u[None].to(weight.dtype))

    # ---- which block and step this call is -------------------------------------------------------------
    def _upstream_steps(self) -> list[float]:
        steps = getattr(self.pipeline, "denoising_step_list", None)
        return [] if steps is None else [float(s) for s in torch.as_tensor(steps).flatten().tolist() if s > 0]

    def _pre_forward(self, module, args, kwargs):
        t = kwargs.get("t", args[1] if len(args) > 1 else None)
        self._call = {"t": t, "start": int(kwargs.get("current_start", 0) or 0)}

    def _block_and_step(self) -> tuple[int, int]:
        frame_tokens = int(getattr(self.pipeline, "frame_seq_length", 0) or 0)
        per_block = int(getattr(self.pipeline, "num_frame_per_block", 1) or 1)
        block = self._call["start"] // (frame_tokens * per_block) if frame_tokens else 0
        t = self._call["t"]
        step = len(self.steps) - 1  # the t = 0 cache pass uses the last step's scale, as nasa-video does
        if t is not None and self.steps:
            value = float(torch.as_tensor(t).flatten()[0])
            if value > 0:
                step = min(range(len(self.steps)), key=lambda i: abs(self.steps[i] - value))
        return block, max(step, 0)

    def current_scale(self) -> float:
        block, step = self._block_and_step()
        t = self._call["t"]
        sigma = 1.0 if t is None else float(torch.as_tensor(t).flatten()[0]) / 1000.0
        return self.guidance.scale_at(self.schedule(block, step), sigma)

    # ---- the patched cross-attention -------------------------------------------------------------------
    def _patched(self, index: int, module, original):
        hook = self

        def forward(x, context, context_lens=None, crossattn_cache=None):
            scale = hook.current_scale()
            if hook.guidance.name == "none" or not hook._embeddings or not any(hook._alphas(scale)):
                return original(x, context, context_lens, crossattn_cache=crossattn_cache)
            if hook._negative_kv is None:
                hook._build_negative_kv()
            b, n, d = x.shape[0], module.num_heads, module.head_dim
            q = module.norm_q(module.q(x)).view(b, -1, n, d)
            if crossattn_cache is not None and crossattn_cache.get("is_init"):
                k, v = crossattn_cache["k"], crossattn_cache["v"]
            else:
                k = module.norm_k(module.k(context)).view(b, -1, n, d)
                v = module.v(context).view(b, -1, n, d)
                if crossattn_cache is not None:  # fill upstream's own cache exactly as upstream would
                    crossattn_cache["is_init"] = True
                    crossattn_cache["k"], crossattn_cache["v"] = k, v
            k_neg, v_neg = hook._negative_kv[index]
            negatives = (k_neg.to(k.dtype).expand(b, -1, -1, -1), v_neg.to(v.dtype).expand(b, -1, -1, -1))
            hook.setting.alphas = tuple(hook._alphas(scale))
            out = hook.processors[index].attend(q, merge_text_kv((k, v), [negatives], n, hook.negative_lengths))
            return module.o(out.flatten(2).to(x.dtype))

        return forward

    def _alphas(self, scale: float) -> list[float]:
        return [scale * w for w in self.weights]

    def enable(self) -> UpstreamGuidance:
        if self._pre_hook is not None:  # already enabled
            return self
        for i, m in enumerate(self.modules):
            m.forward = self._patched(i, m, m.forward)
        self._pre_hook = self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        return self

    def remove(self) -> None:
        """Restore upstream's forwards (the instance attribute goes; the class method shows through again)."""
        for m in self.modules:
            m.__dict__.pop("forward", None)
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None

    def __enter__(self) -> UpstreamGuidance:
        return self.enable()

    def __exit__(self, *exc) -> None:
        self.remove()


def enable_guidance(pipeline, negative=None, scale=0.5, method: str = "nasa", negative_embeddings=None,
                    weights=None) -> UpstreamGuidance:
    """Patch an upstream pipeline for negative guidance; use as `with enable_guidance(...):` or call .remove()."""
    return UpstreamGuidance(pipeline, negative, scale, method, negative_embeddings, weights).enable()


# ---- `nasa-video upstream ...`: upstream's own inference entry, with the hook --------------------------
UPSTREAMS = {
    # name: (submodule folder, environment variable, entry script, module, pipeline class)
    "causvid": ("third_party/causvid", "NASA_VIDEO_CAUSVID", "minimal_inference/autoregressive_inference.py",
                "causvid.models.wan.causal_inference", "InferencePipeline"),
    "self-forcing": ("third_party/self_forcing", "NASA_VIDEO_SELF_FORCING", "inference.py",
                     "pipeline", "CausalInferencePipeline"),
}


def upstream_root(name: str, path: str | None = None):
    """The upstream checkout: --repo, else its environment variable, else the submodule in this repository."""
    import os
    from pathlib import Path

    folder, env, script, _, _ = UPSTREAMS[name]
    candidates = [path] if path else [os.environ.get(env), str(Path(__file__).parents[1] / folder)]
    for candidate in candidates:
        if candidate and (Path(candidate) / script).is_file():
            return Path(candidate).resolve()
    fetch = (f"git submodule update --init {folder}" if name == "causvid"
             else f"git clone https://github.com/guandeh17/Self-Forcing {folder}")
    raise UserError(f"upstream {name} code not found (looked for {script} in "
                    f"{path or ' and '.join(c for c in candidates if c)}); fetch it with `{fetch}` "
                    f"from the nasa-video checkout, or pass --repo / set {env}")


def run_upstream(name: str, upstream_args: list[str], negative: list[str], scale: float, method: str,
                 repo: str | None = None) -> None:
    """Run upstream's inference script as upstream's README says, with every pipeline.inference() call
    wrapped in the guidance hook (built once per pipeline, so the negative K/V are made once)."""
    import importlib
    import os
    import runpy
    import sys

    root = upstream_root(name, repo)
    _, _, script, module_name, class_name = UPSTREAMS[name]
    make_guidance(method).check_scale(scale)
    cwd, argv, path = os.getcwd(), sys.argv, list(sys.path)
    os.chdir(root)  # upstream opens wan_models/... and configs/... relative to its own root
    sys.path.insert(0, str(root))
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
        original = cls.inference

        def inference(self, *args, **kwargs):
            hook = self.__dict__.get("_nasa_video_hook")
            if hook is None:
                hook = UpstreamGuidance(self, negative or None, scale, method)
                self.__dict__["_nasa_video_hook"] = hook
            with hook:
                return original(self, *args, **kwargs)

        cls.inference = inference
        sys.argv = [script, *upstream_args]
        try:
            runpy.run_path(str(root / script), run_name="__main__")
        finally:
            cls.inference = original
    finally:
        os.chdir(cwd)
        sys.argv, sys.path[:] = argv, path
