"""Negative prompts for diffusers' own Wan pipelines (WanPipeline, WanImageToVideoPipeline, Wan 2.2's two experts),
through NASA (or NAG / VSF) inside cross-attention: one transformer forward per step, at guidance 1, where
distilled Wan checkpoints and LoRAs (CausVid, Self-Forcing, lightx2v) run and diffusers ignores the negative.

    from nasa_video.diffusers import enable_guidance

    pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16).to("cuda")
    with enable_guidance(pipe, negative_prompt="blurry, low quality", scale=0.5):
        video = pipe("a fox running through snow", guidance_scale=1.0, num_inference_steps=4).frames[0]

What it does. Every `attn2` of `pipe.transformer` (and `pipe.transformer_2`) gets a processor of this module through
diffusers' `set_attn_processor`. The negative is encoded with the pipeline's own text encoder, passed through the
transformer's own text embedder, and its K/V are computed once per pipeline call per layer (norm_k applied, LoRA
layers included since they sit in to_k / to_v). At every step Z = Z+ - alpha * Z- is computed by the project's
guidance methods before the output projection; the image branch of image-to-video attends as diffusers does.

- `pipe(..., negative_prompt=...)` at guidance_scale <= 1 (which diffusers would drop) is honoured in attention and
  replaces the enabled negatives for that call, with a one-line note.
- guidance_scale > 1 keeps diffusers' CFG as it is: the call's negative prompt is CFG's unconditional branch, and
  the enabled negatives guide the conditional pass only (the unconditional pass runs diffusers' own processor).
- A step whose scale is 0 (or NAG at <= 1, or below its sigma_end) runs diffusers' own processor: bit for bit the
  plain pipeline.
- `disable_guidance(pipe)`, or leaving the `with` block, puts back the processors that were there.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from .attention import attend
from .errors import UserError
from .guidance import Guidance, ScaleSchedule, make_guidance, merge_text_kv, parse_negatives, real_length

log = logging.getLogger("nasa_video")

ScaleLike = float | Sequence[float] | Callable[[int], float]


def _wan_transformers(pipe) -> list[tuple[str, torch.nn.Module]]:
    """(name, transformer) for each Wan transformer of the pipeline; a one-line error if it is not a Wan pipeline."""
    found = [(name, getattr(pipe, name, None)) for name in ("transformer", "transformer_2")]
    found = [(name, t) for name, t in found if t is not None]
    if not found or not all(_is_wan(t) for _, t in found):
        kind = type(getattr(pipe, "transformer", pipe)).__name__
        raise UserError(f"enable_guidance needs a diffusers Wan pipeline (WanPipeline, WanImageToVideoPipeline, ...) "
                        f"whose transformer has Wan cross-attention blocks; got {type(pipe).__name__} with {kind}")
    for attr in ("encode_prompt", "scheduler"):
        if not hasattr(pipe, attr):
            raise UserError(f"{type(pipe).__name__} has no .{attr}: enable_guidance needs a diffusers Wan pipeline")
    return found


def _is_wan(transformer) -> bool:
    blocks = getattr(transformer, "blocks", None)
    embedder = getattr(getattr(transformer, "condition_embedder", None), "text_embedder", None)
    if blocks is None or embedder is None or not hasattr(transformer, "set_attn_processor"):
        return False
    needed = ("to_q", "to_k", "to_v", "to_out", "norm_q", "norm_k", "heads")
    return len(blocks) > 0 and all(all(hasattr(getattr(b, "attn2", None), n) for n in needed) for b in blocks)


def _schedule(scale: ScaleLike) -> ScaleSchedule:
    """A constant, a list per step (the last repeats), or a function step -> scale, as a ScaleSchedule(block 0, step)."""
    if callable(scale):
        return ScaleSchedule(lambda block, step: scale(step))
    if isinstance(scale, (int, float)):
        return ScaleSchedule(float(scale))
    steps = [float(s) for s in scale]
    if not steps:
        raise UserError("scale is an empty list: give a number, a list with one scale per step, or a function")
    return ScaleSchedule([steps])


def project_kv(attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Wan cross-attention's (K, V) [B, L, H, D] of embedded text [B, L, dim], norm_k applied (fused or not)."""
    if getattr(attn, "fused_projections", False):
        k, v = attn.to_kv(context).chunk(2, dim=-1)
    else:
        k, v = attn.to_k(context), attn.to_v(context)
    return attn.norm_k(k).unflatten(2, (attn.heads, -1)), v.unflatten(2, (attn.heads, -1))


def _image_attention(attn, q: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Image-to-video: the query's attention over the CLIP image tokens (added K/V), as the Wan layer defines it."""
    if getattr(attn, "fused_projections", False):
        k, v = attn.to_added_kv(image).chunk(2, dim=-1)
    else:
        k, v = attn.add_k_proj(image), attn.add_v_proj(image)
    k = attn.norm_added_k(k).unflatten(2, (attn.heads, -1))
    return attend(q, k, v.unflatten(2, (attn.heads, -1)))


class NegativeAttnProcessor:
    """The processor on one `attn2`: diffusers' own processor when this pass is unguided, else the guided attention
    with this call's cached negative K/V."""

    def __init__(self, guidance: "DiffusersGuidance", transformer_name: str, layer: int, original):
        self.guidance, self.transformer_name, self.layer, self.original = guidance, transformer_name, layer, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        alphas = self.guidance.alphas_now()
        if not alphas or attention_mask is not None or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        image = None
        if getattr(attn, "add_k_proj", None) is not None:  # image-to-video: [CLIP image tokens | text tokens]
            split = encoder_hidden_states.shape[1] - self.guidance.text_tokens
            image, encoder_hidden_states = encoder_hidden_states[:, :split], encoder_hidden_states[:, split:]
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k_pos, v_pos = project_kv(attn, encoder_hidden_states)
        negative_kv, lengths = self.guidance.negative_kv(self.transformer_name, self.layer, attn,
                                                         length=k_pos.shape[1], batch=q.shape[0])
        text = merge_text_kv((k_pos, v_pos), negative_kv, attn.heads, lengths)
        z = self.guidance.method.prepare(text, alphas)(q)
        if image is not None:
            z = z + _image_attention(attn, q, image)
        out = attn.to_out[0](z.flatten(2).type_as(q))
        return attn.to_out[1](out)


class DiffusersGuidance:
    """NASA (or NAG / VSF) on a diffusers Wan pipeline. Made by enable_guidance(); a context manager."""

    def __init__(self, pipe, negative_prompt=None, scale: ScaleLike = 0.5, method: str | Guidance = "nasa",
                 negative_prompt_embeds: torch.Tensor | Sequence[torch.Tensor] | None = None,
                 weights: Sequence[float] | None = None, max_sequence_length: int = 512):
        self.pipe = pipe
        self.transformers = _wan_transformers(pipe)
        self.method = make_guidance(method) if isinstance(method, str) else method
        if not self.method.in_attention:
            raise UserError(f"{self.method.name} acts on the model's outputs: in diffusers that is the pipeline's own "
                            f"guidance_scale > 1; enable_guidance takes nasa, nag or vsf")
        self.max_sequence_length = max_sequence_length
        self.set_scale(scale)
        self.set_negative(negative_prompt, negative_prompt_embeds, weights)
        self._originals: dict[str, dict] | None = None
        self._hooks: list = []
        self._call_negatives: list[tuple[torch.Tensor, float]] | None = None  # this call's negative, if it has one
        self._unconditional: torch.Tensor | None = None  # CFG's unconditional embeddings of this call
        self._kv: dict[tuple[str, int], tuple[list, tuple]] = {}  # per (transformer, layer): this call's negative K/V
        self._contexts: dict[str, list[torch.Tensor]] = {}  # per transformer: the negatives through its text embedder
        self._pass = {"step": 0, "sigma": 1.0, "unconditional": False}
        self.text_tokens = 0
        self._noted = False

    # ---- what the user sets ---------------------------------------------------------------------------
    def set_scale(self, scale: ScaleLike) -> None:
        """A constant, a list with one scale per step (the last repeats) or a function step -> scale."""
        schedule = _schedule(scale)  # a non-number is refused here
        for value in schedule.values():
            self.method.check_scale(value)
        self.schedule = schedule

    def set_negative(self, negative_prompt=None, negative_prompt_embeds=None,
                     weights: Sequence[float] | None = None) -> None:
        """Text ("a", ["a", "b"], [("a", 1.0), ("b", 0.5)], {"a": 1.0}: several are summed, each with its weight),
        or embeddings as the pipeline's encode_prompt returns them ([1, L, C] or [B, L, C] each). Text is encoded
        now, with the pipeline's own tokenizer and text encoder."""
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise UserError("give negative_prompt or negative_prompt_embeds, not both")
        if negative_prompt_embeds is not None:
            embeds = [negative_prompt_embeds] if torch.is_tensor(negative_prompt_embeds) else list(negative_prompt_embeds)
            embeds = [e if e.ndim == 3 else e[None] for e in embeds]
            weights = [1.0] * len(embeds) if weights is None else [float(w) for w in weights]
        else:
            pairs = parse_negatives(negative_prompt)
            if weights is not None:
                if len(weights) != len(pairs):
                    raise UserError(f"{len(weights)} weights for {len(pairs)} negative prompts")
                pairs = [(t, float(w)) for (t, _), w in zip(pairs, weights)]
            embeds = [self._encode(t) for t, _ in pairs]
            weights = [w for _, w in pairs]
        if len(weights) != len(embeds):
            raise UserError(f"{len(weights)} weights for {len(embeds)} negative prompt embeddings")
        self.method.check_negatives(len(embeds))
        self.method.check_weights(weights, self.schedule.values())  # each term and their sum
        self.negatives = list(zip(embeds, weights))
        self._kv, self._contexts = {}, {}

    def _encode(self, text: str) -> torch.Tensor:
        self._check_length(text, self.max_sequence_length)
        with torch.no_grad():
            embeds, _ = self._original_encode(prompt=text, do_classifier_free_guidance=False,
                                              max_sequence_length=self.max_sequence_length)
        return embeds

    @property
    def _original_encode(self):
        return getattr(self, "_encode_prompt", None) or self.pipe.encode_prompt

    def _check_length(self, text: str, limit: int) -> None:
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if tokenizer is None:
            raise UserError("the pipeline has no tokenizer: pass negative_prompt_embeds instead of text")
        count = len(tokenizer(text, add_special_tokens=True)["input_ids"])
        if count > limit:
            raise UserError(f"the negative prompt is {count} tokens, over the limit of {limit} "
                            f"(max_sequence_length): shorten it")

    # ---- install and remove ---------------------------------------------------------------------------
    def enable(self) -> "DiffusersGuidance":
        if self._originals is not None:
            return self
        if getattr(self.pipe, "_nasa_guidance", None) is not None:
            raise UserError("guidance is already enabled on this pipeline: call disable_guidance(pipe) first")
        self._originals = {}
        for name, transformer in self.transformers:
            originals = dict(transformer.attn_processors)
            self._originals[name] = originals
            new = dict(originals)
            for i, block in enumerate(transformer.blocks):
                key = f"blocks.{i}.attn2.processor"
                new[key] = NegativeAttnProcessor(self, name, i, originals[key])
            transformer.set_attn_processor(new)
            self._hooks.append(transformer.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        # The pipeline's encode_prompt marks the start of a call, and hands over the call's negative.
        self._encode_prompt = self.pipe.encode_prompt
        self._own_encode = "encode_prompt" in vars(self.pipe)  # someone's wrapper already: put it back on exit
        self.pipe.encode_prompt = self._encode_for_call
        self.pipe._nasa_guidance = self
        return self

    def disable(self) -> None:
        if self._originals is None:
            return
        for name, transformer in self.transformers:
            transformer.set_attn_processor(self._originals[name])
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._own_encode:
            self.pipe.encode_prompt = self._encode_prompt
        else:
            del self.pipe.encode_prompt  # the instance attribute goes; the class's method shows again
        self._encode_prompt = None
        self.pipe._nasa_guidance = None
        self._originals, self._kv, self._contexts = None, {}, {}

    def __enter__(self):
        return self.enable()

    def __exit__(self, *exc):
        self.disable()

    # ---- one pipeline call ----------------------------------------------------------------------------
    def _encode_for_call(self, prompt=None, negative_prompt=None, do_classifier_free_guidance=True,
                         num_videos_per_prompt=1, prompt_embeds=None, negative_prompt_embeds=None,
                         max_sequence_length=226, device=None, dtype=None, **kwargs):
        """The pipeline's encode_prompt, plus: a new call (the negative K/V are computed afresh), and at
        guidance <= 1 the call's negative prompt, which diffusers would drop, encoded for attention."""
        self._kv, self._contexts, self._call_negatives, self._unconditional = {}, {}, None, None
        args = dict(prompt=prompt, negative_prompt=negative_prompt, num_videos_per_prompt=num_videos_per_prompt,
                    prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                    max_sequence_length=max_sequence_length, device=device, dtype=dtype, **kwargs)
        texts = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt or [])
        given = negative_prompt_embeds is not None or any(t.strip() for t in texts)  # front ends often pass ""
        if not do_classifier_free_guidance and given:
            for text in texts:
                self._check_length(text, max_sequence_length)
            positive, negative = self._encode_prompt(do_classifier_free_guidance=True, **args)
            self._call_negatives = [(negative, 1.0)]
            if not self._noted:
                log.warning("nasa-video: guidance_scale <= 1, so diffusers would ignore negative_prompt; %s applies it "
                            "in cross-attention instead (one forward per step)", self.method.name)
                self._noted = True
            return positive, None
        positive, negative = self._encode_prompt(do_classifier_free_guidance=do_classifier_free_guidance, **args)
        self._unconditional = negative if do_classifier_free_guidance else None
        return positive, negative

    def _before_forward(self, module, args, kwargs):
        """Which step this forward is (the scheduler's step index) and whether it is CFG's unconditional pass."""
        scheduler = self.pipe.scheduler
        step = getattr(scheduler, "step_index", None) or 0
        sigmas = getattr(scheduler, "sigmas", None)
        sigma = float(sigmas[min(step, len(sigmas) - 1)]) if sigmas is not None and len(sigmas) else 1.0
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        uncond = self._unconditional
        unconditional = uncond is not None and context is not None and (
            context is uncond or (context.shape == uncond.shape and torch.equal(context, uncond.to(context.dtype))))
        self._pass = {"step": step, "sigma": sigma, "unconditional": unconditional}
        # image-to-video: attn2's context is [image tokens | text tokens]; the image embedder may merge two images
        # (first-last frame), so the text's length is what splits them
        self.text_tokens = 0 if context is None else int(context.shape[1])

    def _active_negatives(self) -> list[tuple[torch.Tensor, float]]:
        return self._call_negatives if self._call_negatives is not None else self.negatives

    def alphas_now(self) -> tuple[float, ...]:
        """The per-negative alphas of this pass; () when it is unguided (diffusers' own processor runs)."""
        negatives = self._active_negatives()
        if self._pass["unconditional"] or not negatives:
            return ()
        scale = self.schedule.at(0, self._pass["step"], self.method)  # a function's value is checked only now
        scale = self.method.scale_at(scale, self._pass["sigma"])
        alphas = tuple(scale * w for _, w in negatives)
        return alphas if self.method.guides(alphas) else ()

    def negative_kv(self, transformer_name: str, layer: int, attn, length: int, batch: int):
        """This call's negative K/V for one layer, [(K, V) [batch, length, H, D] per negative] and their real lengths;
        computed on the layer's first guided pass of the call, then reused."""
        key = (transformer_name, layer)
        if key not in self._kv:
            contexts, lengths = self._negative_contexts(transformer_name, length)
            with torch.no_grad():
                self._kv[key] = ([project_kv(attn, c) for c in contexts], lengths)
        kvs, lengths = self._kv[key]
        return [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) if k.shape[0] == 1 else (k, v)
                for k, v in kvs], lengths

    def _negative_contexts(self, transformer_name: str, length: int):
        if transformer_name not in self._contexts:
            transformer = dict(self.transformers)[transformer_name]
            embedder = transformer.condition_embedder.text_embedder
            param = next(embedder.parameters())
            contexts, lengths = [], tuple(real_length(e) for e, _ in self._active_negatives())
            for (embeds, _), real in zip(self._active_negatives(), lengths):
                if real > length:
                    raise UserError(f"the negative prompt has {real} tokens but this call's prompt has {length} "
                                    f"(max_sequence_length): raise max_sequence_length or shorten the negative")
                embeds = embeds[:, :length]
                if embeds.shape[1] < length:
                    embeds = torch.cat([embeds, embeds.new_zeros(embeds.shape[0], length - embeds.shape[1],
                                                                 embeds.shape[2])], 1)
                with torch.no_grad():
                    contexts.append(embedder(embeds.to(param.device, param.dtype)))
            self._contexts[transformer_name] = (contexts, lengths)
        return self._contexts[transformer_name]


def enable_guidance(pipe, negative_prompt=None, scale: ScaleLike = 0.5, method: str | Guidance = "nasa",
                    negative_prompt_embeds=None, weights: Sequence[float] | None = None,
                    max_sequence_length: int = 512) -> DiffusersGuidance:
    """Install negative guidance in a diffusers Wan pipeline's cross-attention; returns the handle (also a context
    manager: leaving it disables). scale: alpha for NASA, nag_scale for NAG, s for VSF; a number, one per step, or
    a function step -> scale. method: "nasa", "nag", "vsf" or a Guidance object (its settings: NAG(tau=...))."""
    return DiffusersGuidance(pipe, negative_prompt, scale, method, negative_prompt_embeds, weights,
                             max_sequence_length).enable()


def disable_guidance(pipe) -> None:
    """Put back the pipeline's own cross-attention processors and encode_prompt."""
    handle = getattr(pipe, "_nasa_guidance", None)
    if handle is not None:
        handle.disable()
