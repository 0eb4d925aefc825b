"""The ComfyUI node "NASA negative (Wan)": a MODEL in, a patched copy out, whose Wan cross-attention subtracts the
negative prompt's attention output (NASA: Z = Z+ - alpha Z-; NAG and VSF also), so a distilled Wan checkpoint or LoRA
sampled at CFG 1 honours a negative prompt with one forward per step.

How it patches: `model.clone()`, then one ModelPatcher object patch per block on `diffusion_model.blocks.{i}.cross_attn`.
ComfyUI applies object patches when it loads the model for sampling and undoes them afterwards, so the MODEL that
came in, and every other model in the process, keep ComfyUI's own classes. The patch module shares the original
layer's submodules (q, k, v, o, norms), so ComfyUI's weight patches (LoRAs) reach the same parameters by the same keys.

Per pass, from ComfyUI's transformer_options: `cond_or_uncond` picks the rows that are guided (the positive's; with
CFG > 1 the unconditional rows run ComfyUI's own attention), `sigmas` and `sample_sigmas` give the step for
start_step / end_step. An unguided pass calls the original layer, bit for bit. The negative's K/V are computed once
per sampling run and layer (through the model's own text embedding and k / v projections).

Nothing here imports ComfyUI at module level: the node class is importable (and testable) wherever nasa_video is.
"""
from __future__ import annotations

import torch

from . import attention as _kernels  # noqa: F401  (binds guidance's kernels before ComfyUI may compile the model)
from .errors import UserError
from .guidance import METHODS, make_guidance, nag, nasa, real_length, vsf

METHOD_CHOICES = ("nasa", "nag", "vsf")


def _wan_attention():
    """ComfyUI's attention function as its Wan layers call it (the user's chosen backend)."""
    from comfy.ldm.wan import model as wan

    return wan.optimized_attention


def wan_model(model):
    """The Wan diffusion model inside a ComfyUI MODEL (a ModelPatcher); a one-line error when it is not Wan."""
    getter = getattr(model, "get_model_object", None)
    if getter is None or not hasattr(model, "clone"):
        raise UserError(f"the NASA negative node takes a ComfyUI MODEL (a ModelPatcher); got {type(model).__name__}")
    try:
        diffusion = getter("diffusion_model")
    except AttributeError:
        diffusion = None
    blocks = getattr(diffusion, "blocks", None)
    needed = ("q", "k", "v", "o", "norm_q", "norm_k", "num_heads")
    if blocks is None or not hasattr(diffusion, "text_embedding") or not all(
            all(hasattr(getattr(b, "cross_attn", None), n) for n in needed) for b in blocks):
        raise UserError(f"the NASA negative node patches Wan models (Wan 2.1 / 2.2 text- or image-to-video); this "
                        f"MODEL holds {type(diffusion).__name__}")
    return diffusion


def negative_embeddings(conditioning, text_dim: int, text_len: int) -> list[torch.Tensor]:
    """The negative CONDITIONING's umT5 embeddings, [1, L, text_dim] each; one line when it is of the wrong kind."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning or not all(
            isinstance(c, (list, tuple)) and len(c) >= 1 and torch.is_tensor(c[0]) for c in conditioning):
        raise UserError("the negative input must be a CONDITIONING (from CLIP Text Encode with the Wan umT5 text "
                        f"encoder); got {type(conditioning).__name__}")
    out = []
    for entry in conditioning:
        embeds = entry[0]
        if embeds.ndim != 3 or embeds.shape[-1] != text_dim:
            raise UserError(f"the negative CONDITIONING is {tuple(embeds.shape)}, but this Wan model takes umT5 text "
                            f"embeddings of width {text_dim}: encode the negative with the Wan text encoder")
        length = real_length(embeds)
        if length > text_len:
            raise UserError(f"the negative prompt is {length} tokens, over the limit of {text_len} the Wan model "
                            f"reads: shorten it")
        out.append(embeds)  # padding kept: Wan attends to all its text positions, the negative's too (VSF drops it)
    return out


def step_of(transformer_options: dict) -> int | None:
    """This pass's step in the sampler's schedule: the nearest of sample_sigmas to the pass's sigma."""
    sigmas, schedule = transformer_options.get("sigmas"), transformer_options.get("sample_sigmas")
    if sigmas is None or schedule is None or len(schedule) == 0:
        return None
    return int((schedule.float().cpu() - float(sigmas.flatten()[0])).abs().argmin())


class NegativeGuidance:
    """What every patched layer of one node shares: the method, scale, step window and the negative's K/V cache."""

    def __init__(self, diffusion, negatives: list[torch.Tensor], scale: float, method: str,
                 start_step: int = 0, end_step: int = 10000):
        self.diffusion, self.negatives = diffusion, negatives
        self.lengths = [max(real_length(e), 1) for e in negatives]
        self.method = make_guidance(method)
        self.scale, self.start_step, self.end_step = float(scale), int(start_step), int(end_step)
        self._run = None  # the sampling run the cache belongs to (its sample_sigmas tensor)
        self._kv: dict = {}

    def guided_rows(self, transformer_options: dict, batch: int):
        """(row mask, alphas) for this pass, or None when the original layer should run."""
        step = step_of(transformer_options)
        if step is not None and not self.start_step <= step < self.end_step:
            return None
        sigmas = transformer_options.get("sigmas")
        sigma = float(sigmas.flatten()[0]) if sigmas is not None else 1.0
        alphas = tuple(self.method.scale_at(self.scale, sigma) for _ in self.negatives)
        if not self.method.guides(alphas):
            return None
        labels = transformer_options.get("cond_or_uncond")
        if not labels:
            return [True] * batch, alphas
        chunk = batch // len(labels)
        rows = [label == 0 for label in labels for _ in range(chunk)]
        return (rows, alphas) if any(rows) else None

    def negative_kv(self, layer: int, attention, like: torch.Tensor, transformer_options: dict):
        """The negatives' (K, V) [1, L, C] for one layer: once per sampling run, device and dtype."""
        run = transformer_options.get("sample_sigmas")
        if run is not self._run:
            self._run, self._kv = run, {}
        key = (layer, like.device, like.dtype)
        if key not in self._kv:
            with torch.no_grad():
                contexts = [self.diffusion.text_embedding(e.to(like.device, like.dtype)) for e in self.negatives]
                self._kv[key] = [(attention.norm_k(attention.k(c)), attention.v(c)) for c in contexts]
        return self._kv[key]


class NegativeCrossAttention(torch.nn.Module):
    """Stands in for one block's cross_attn (an object patch). Shares the original's submodules, so parameter keys
    and ComfyUI's weight patches are unchanged; unguided passes call the original layer."""

    def __init__(self, original: torch.nn.Module, guidance: NegativeGuidance, layer: int):
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        self.num_heads, self.head_dim = original.num_heads, getattr(original, "head_dim", None)
        self._original = (original,)  # a tuple, so it is not a second copy of the submodules in the module tree
        self.guidance, self.layer = guidance, layer

    @property
    def original(self) -> torch.nn.Module:
        return self._original[0]

    def forward(self, x, context, context_img_len=None, transformer_options={}, **kwargs):  # ComfyUI's signature
        def unguided(rows=None):
            rows_x, rows_context = (x, context) if rows is None else (x[rows], context[rows])
            return self.original(rows_x, rows_context, context_img_len=context_img_len,
                                 transformer_options=transformer_options, **kwargs)
        plan = self.guidance.guided_rows(transformer_options, x.shape[0])
        if plan is None:
            return unguided()
        rows, alphas = plan
        if all(rows):
            return self.guided(x, context, context_img_len, transformer_options, alphas)
        mask = torch.tensor(rows, device=x.device)
        out = torch.empty_like(x)
        out[~mask] = unguided(~mask)
        out[mask] = self.guided(x[mask], context[mask], context_img_len, transformer_options, alphas)
        return out

    def guided(self, x, context, context_img_len, transformer_options, alphas):
        attend = _wan_attention()
        layer, heads = self.original, self.num_heads
        image = None
        if context_img_len is not None and hasattr(layer, "k_img"):  # image-to-video: [CLIP image tokens | text]
            image, context = context[:, :context_img_len], context[:, context_img_len:]
        q = layer.norm_q(layer.q(x))
        k, v = layer.norm_k(layer.k(context)), layer.v(context)
        negatives = [(nk.expand(x.shape[0], -1, -1), nv.expand(x.shape[0], -1, -1))
                     for nk, nv in self.guidance.negative_kv(self.layer, layer, x, transformer_options)]

        def split(t):  # [B, L, H * D] -> [B, L, H, D], the project's layout
            return t.unflatten(2, (heads, -1))
        method = self.guidance.method
        if method.name == "vsf":  # one softmax over [K+; K-] without the negative's padding
            length = self.guidance.lengths[0]
            z = vsf(split(q), split(k), split(v), split(negatives[0][0][:, :length]),
                    split(negatives[0][1][:, :length]), alphas[0], method.bias).flatten(2)
        else:
            z_pos = attend(q, k, v, heads=heads, transformer_options=transformer_options)
            z_neg = torch.stack([split(attend(q, nk, nv, heads=heads, transformer_options=transformer_options))
                                 for nk, nv in negatives], 2)
            if method.name == "nag":
                z = nag(split(z_pos), z_neg[:, :, 0], alphas[0], method.tau, method.blend).flatten(2)
            else:
                z = nasa(split(z_pos), z_neg, alphas).flatten(2)
        if image is not None:
            z = z + attend(q, layer.norm_k_img(layer.k_img(image)), layer.v_img(image), heads=heads,
                           transformer_options=transformer_options)
        return layer.o(z.to(x.dtype))


class NASANegativeWan:
    """ComfyUI node: MODEL + negative CONDITIONING + scale -> a patched copy of the MODEL."""

    CATEGORY = "advanced/guidance"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    DESCRIPTION = ("Negative prompt inside Wan's cross-attention (NASA, arXiv 2412.02687): works at CFG 1, for "
                   "distilled Wan checkpoints and LoRAs, for about 1% more compute per step.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "negative": ("CONDITIONING",),
                "scale": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 20.0, "step": 0.05,
                                    "tooltip": "alpha for nasa (0-3), nag_scale for nag (1-20), s for vsf (0-5)"}),
            },
            "optional": {
                "method": (list(METHOD_CHOICES), {"default": "nasa"}),
                "start_step": ("INT", {"default": 0, "min": 0, "max": 10000}),
                "end_step": ("INT", {"default": 10000, "min": 0, "max": 10000,
                                     "tooltip": "guide steps start_step <= step < end_step"}),
            },
        }

    def patch(self, model, negative, scale, method="nasa", start_step=0, end_step=10000):
        if method not in METHOD_CHOICES or method not in METHODS:
            raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHOD_CHOICES)}")
        guidance_method = make_guidance(method)
        guidance_method.check_scale(float(scale))
        if not 0 <= start_step <= end_step:
            raise UserError(f"start_step {start_step} and end_step {end_step}: need 0 <= start_step <= end_step")
        diffusion = wan_model(model)
        if isinstance(model.get_model_object("diffusion_model.blocks.0.cross_attn"), NegativeCrossAttention):
            raise UserError("this MODEL already went through a NASA negative node: give one node all the negatives "
                            "(Conditioning (Combine)) instead of chaining two")
        text_dim = diffusion.text_embedding[0].in_features
        negatives = negative_embeddings(negative, text_dim, int(getattr(diffusion, "text_len", 512)))
        guidance_method.check_negatives(len(negatives))
        guidance = NegativeGuidance(diffusion, negatives, scale, method, start_step, end_step)
        patched = model.clone()
        for i in range(len(diffusion.blocks)):
            key = f"diffusion_model.blocks.{i}.cross_attn"
            patched.add_object_patch(key, NegativeCrossAttention(model.get_model_object(key), guidance, i))
        return (patched,)


NODE_CLASS_MAPPINGS = {"NASANegativeWan": NASANegativeWan}
NODE_DISPLAY_NAME_MAPPINGS = {"NASANegativeWan": "NASA negative (Wan)"}


LOADER = '''"""nasa-video's ComfyUI nodes, installed by `python -m nasa_video.comfyui`: the code is nasa_video.comfyui."""
from nasa_video.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
'''


def install(comfyui_dir: str, name: str = "nasa_video_nodes") -> str:
    """Install the node pack from the installed package: writes custom_nodes/<name>/__init__.py, a two-line loader
    of this module, into a ComfyUI folder. Returns the file written."""
    import os
    from pathlib import Path

    custom = Path(comfyui_dir) / "custom_nodes"
    if not custom.is_dir():
        raise UserError(f"{comfyui_dir} has no custom_nodes/ folder: give the folder ComfyUI runs from")
    folder = custom / name
    target = folder / "__init__.py"
    try:
        folder.mkdir(exist_ok=True)
        partial = folder / ".__init__.py.partial"
        partial.write_text(LOADER)
        os.replace(partial, target)  # atomic: ComfyUI never reads half a file
    except OSError as error:
        raise UserError(f"cannot write {target}: {error.strerror}; check the folder's permissions") from None
    return str(target)


def main(argv=None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m nasa_video.comfyui",
                                     description="Install the 'NASA negative (Wan)' node into a ComfyUI folder.")
    parser.add_argument("comfyui_dir", help="the ComfyUI folder (the one holding custom_nodes/)")
    args = parser.parse_args(argv)
    try:
        path = install(args.comfyui_dir)
    except UserError as error:
        print(f"nasa_video.comfyui: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}; restart ComfyUI (with nasa-video installed in its Python) to load the node")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
