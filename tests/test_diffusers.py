"""NASA in diffusers' own Wan pipelines: the real WanPipeline / WanImageToVideoPipeline and WanTransformer3DModel at
a tiny random size (as diffusers' own pipeline tests build them; the text encoder is a tiny T5 from a config and
ByT5's file-less tokenizer, so nothing is downloaded)."""
import copy
import logging

import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

from nasa_video import UserError
from nasa_video.diffusers import NegativeAttnProcessor, disable_guidance, enable_guidance
from nasa_video.guidance import METHODS, NASA, Guidance, register_method

STEPS, LAYERS, TEXT_LEN = 3, 2, 16
CALL = dict(height=16, width=16, num_frames=5, num_inference_steps=STEPS, max_sequence_length=TEXT_LEN,
            output_type="latent")


def tiny_transformer(**extra):
    torch.manual_seed(0)
    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
                  text_dim=32, freq_dim=256, ffn_dim=32, num_layers=LAYERS, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    model = WanTransformer3DModel(**{**config, **extra})
    with torch.no_grad():  # random init leaves the projections small; widen them so guidance visibly matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_text():
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(1)
    config = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8)
    return T5EncoderModel(config).eval(), ByT5Tokenizer()


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    encoder, tokenizer = tiny_text()
    return WanPipeline(transformer=tiny_transformer(), vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                       text_encoder=encoder, tokenizer=tokenizer)


def run(pipe, seed=0, **kwargs):
    args = dict(CALL, guidance_scale=1.0, generator=torch.Generator().manual_seed(seed))
    args.update(kwargs)
    with torch.no_grad():
        return pipe(prompt="a red fox in a field", **args).frames


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def test_scale_zero_is_the_plain_pipeline_bit_for_bit_and_guidance_changes_it(pipe):
    plain = run(pipe)
    with enable_guidance(pipe, negative_prompt="snow", scale=0.0):
        zero = run(pipe)
    with enable_guidance(pipe, negative_prompt="snow", scale=[0.0, 0.0, 0.0]):  # a per-step schedule of zeros
        zero_list = run(pipe)
    with enable_guidance(pipe, negative_prompt="snow", scale=1.0):
        guided = run(pipe)
    assert torch.equal(zero, plain) and torch.equal(zero_list, plain)
    assert rel(guided, plain) > 1e-3, f"NASA at alpha 1 changed the latents by only {rel(guided, plain):.2e}"
    # the same pipeline, CFG at guidance 3 with the processors installed at scale 0: diffusers' own result
    cfg_plain = run(pipe, guidance_scale=3.0, negative_prompt="snow")
    with enable_guidance(pipe, negative_prompt="snow", scale=0.0):
        cfg_zero = run(pipe, guidance_scale=3.0, negative_prompt="snow")
    assert torch.equal(cfg_zero, cfg_plain)


def _naive_negative_part(attn, hidden, negative_context, alpha):
    """-alpha W_o Z- in float64, Z- = softmax(Q K-^T / sqrt(d)) V- with norm_k on K- (the formula, written out)."""
    a = copy.deepcopy(attn).double()
    h, c = hidden.double(), negative_context.double()
    heads = a.heads
    q = a.norm_q(a.to_q(h)).unflatten(2, (heads, -1)).transpose(1, 2)
    k = a.norm_k(a.to_k(c)).unflatten(2, (heads, -1)).transpose(1, 2)
    v = a.to_v(c).unflatten(2, (heads, -1)).transpose(1, 2)
    z = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
    return -alpha * (z.transpose(1, 2).flatten(2) @ a.to_out[0].weight.T)


@pytest.mark.parametrize("image", [False, True], ids=["text-to-video", "image-to-video"])
def test_guided_cross_attention_equals_the_formula(pipe, image):
    """NASA's output is linear in Z before the output projection, so guided - diffusers' own = -alpha W_o Z-: the
    positive (and, for image-to-video, the image branch) are checked against diffusers' processor itself."""
    transformer = tiny_transformer(image_dim=8, added_kv_proj_dim=24) if image else pipe.transformer
    g = torch.Generator().manual_seed(3)
    length = 512 if image else TEXT_LEN  # diffusers' image-to-video processor takes the last 512 tokens as text
    negative = torch.randn(1, length, 32, generator=g)
    negative[:, 10:] = 0  # Wan's padding rows
    with enable_guidance(pipe, negative_prompt_embeds=negative, scale=0.7) as handle:
        if image:  # the handle serves this transformer as its second expert would be served
            handle.transformers.append(("image", transformer))
            name = "image"
        else:
            name = "transformer"
        attn = transformer.blocks[1].attn2
        original = getattr(attn.processor, "original", attn.processor)  # diffusers' own WanAttnProcessor
        processor = NegativeAttnProcessor(handle, name, 1, original)
        hidden = torch.randn(1, 20, 24, generator=g)
        text = torch.randn(1, length, 24, generator=g)
        context = torch.cat([torch.randn(1, 4, 24, generator=g), text], 1) if image else text
        handle.text_tokens = length
        with torch.no_grad():
            got = processor(attn, hidden, context)
            plain = original(attn, hidden, context)
            negative_context = transformer.condition_embedder.text_embedder(negative)
            want = _naive_negative_part(attn, hidden, negative_context, 0.7)
        if image:
            handle.transformers.pop()
    diff = rel(got - plain, want)
    # fp32 attention and projections against float64: rounding of order 1e-6 of the values
    assert diff < 1e-4, f"guided - plain differs from -alpha W_o Z- by {diff:.2e} of its size"


def _count_calls(modules):
    counts = {"n": 0}

    def hook(*_):
        counts["n"] += 1
    handles = [m.register_forward_hook(hook) for m in modules]
    return counts, handles


def test_one_forward_per_step_and_the_negative_kv_once_per_call(pipe):
    forwards, h1 = _count_calls([pipe.transformer])
    # counted on the K projections themselves (every to_k call: positive per step, negative once per call)
    keys, h2 = _count_calls([b.attn2.to_k for b in pipe.transformer.blocks])
    try:
        with enable_guidance(pipe, negative_prompt=[("snow", 1.0), ("blur", 0.5)], scale=1.0):
            run(pipe)
            assert forwards["n"] == STEPS
            assert keys["n"] == LAYERS * STEPS + LAYERS * 2, keys["n"]
            run(pipe, seed=1)  # a second call computes them afresh, once
            assert forwards["n"] == 2 * STEPS
            assert keys["n"] == 2 * (LAYERS * STEPS + LAYERS * 2), keys["n"]
    finally:
        for h in h1 + h2:
            h.remove()


def test_processors_and_encode_prompt_are_restored(pipe):
    before = dict(pipe.transformer.attn_processors)
    handle = enable_guidance(pipe, negative_prompt="snow", scale=0.5)
    assert all(isinstance(p, NegativeAttnProcessor) for k, p in pipe.transformer.attn_processors.items() if "attn2" in k)
    with pytest.raises(UserError, match="already enabled"):
        enable_guidance(pipe, negative_prompt="snow")
    disable_guidance(pipe)
    after = pipe.transformer.attn_processors
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert "encode_prompt" not in vars(pipe) and pipe.encode_prompt.__func__ is WanPipeline.encode_prompt
    handle.disable()  # twice is harmless
    wrapper = pipe.encode_prompt  # someone's own wrapper on the instance is put back too
    pipe.encode_prompt = wrapper
    with enable_guidance(pipe, negative_prompt="snow"):
        assert pipe.encode_prompt is not wrapper
    assert vars(pipe)["encode_prompt"] is wrapper
    del pipe.encode_prompt
    with pytest.raises(RuntimeError, match="boom"):
        with enable_guidance(pipe, negative_prompt="snow"):
            raise RuntimeError("boom")
    assert all(before[k] is pipe.transformer.attn_processors[k] for k in before)


def test_the_calls_negative_prompt_is_honoured_at_guidance_one(pipe, caplog):
    plain = run(pipe, negative_prompt="snow")  # diffusers ignores it at guidance 1
    assert torch.equal(plain, run(pipe))
    with enable_guidance(pipe, negative_prompt="snow", scale=1.0):
        standing = run(pipe)
    with enable_guidance(pipe, scale=1.0):
        with caplog.at_level(logging.WARNING, logger="nasa_video"):
            per_call = run(pipe, negative_prompt="snow")
        after = run(pipe)  # a call without one: no negative, the plain pipeline
    assert torch.equal(per_call, standing), rel(per_call, standing)
    with enable_guidance(pipe, negative_prompt="snow", scale=1.0):  # front ends pass "": not a negative
        assert torch.equal(run(pipe, negative_prompt=""), standing)
    assert torch.equal(after, plain)
    notes = [r.getMessage() for r in caplog.records if "ignore negative_prompt" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0]


def test_cfg_guides_only_the_conditional_pass(pipe, monkeypatch):
    prepared = {"n": 0}
    real = NASA.prepare

    def counting(self, kv, alphas):
        prepared["n"] += 1
        return real(self, kv, alphas)
    monkeypatch.setattr(NASA, "prepare", counting)
    forwards, hooks = _count_calls([pipe.transformer])
    try:
        with enable_guidance(pipe, negative_prompt="snow", scale=1.0):
            cfg_nasa = run(pipe, guidance_scale=3.0, negative_prompt="blur")
    finally:
        for h in hooks:
            h.remove()
    assert forwards["n"] == 2 * STEPS  # diffusers' CFG: two passes per step
    assert prepared["n"] == STEPS * LAYERS  # NASA in the conditional pass only
    assert rel(cfg_nasa, run(pipe, guidance_scale=3.0, negative_prompt="blur")) > 1e-3


def test_schedules_nag_vsf_and_registered_methods(pipe):
    plain = run(pipe)
    with enable_guidance(pipe, negative_prompt="snow", scale=[1.0, 0.0, 0.0]):
        first_only = run(pipe)
    with enable_guidance(pipe, negative_prompt="snow", scale=lambda step: 1.0 if step == 0 else 0.0):
        by_function = run(pipe)
    assert torch.equal(first_only, by_function) and not torch.equal(first_only, plain)
    with enable_guidance(pipe, negative_prompt="snow", scale=1.0, method="nag"):  # nag_scale 1 does not guide
        assert torch.equal(run(pipe), plain)
    for method, scale in (("nag", 4.0), ("vsf", 1.0)):
        with enable_guidance(pipe, negative_prompt="snow", scale=scale, method=method):
            assert rel(run(pipe), plain) > 1e-3, method

    @register_method
    class Doubled(Guidance):  # a method defined only by its formula, registered from a test file
        name = "doubled-nasa"
        scale_range = (0.0, 3.0)

        def cross_attention(self, q, kv, alphas):
            return NASA().prepare(kv, [2 * a for a in alphas])(q)
    try:
        with enable_guidance(pipe, negative_prompt="snow", scale=0.5, method="doubled-nasa"):
            doubled = run(pipe)
        with enable_guidance(pipe, negative_prompt="snow", scale=1.0):
            nasa_one = run(pipe)
        assert rel(doubled, nasa_one) < 1e-5
    finally:
        METHODS.pop("doubled-nasa")


def test_loras_are_guided_through(pipe):
    """The negative K/V go through the LoRA layers of to_k / to_v: an unmerged LoRA equals the merged one."""
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    transformer = pipe.transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                       init_lora_weights=False), adapter_name="test")
    try:
        with enable_guidance(pipe, negative_prompt="snow", scale=1.0):
            unmerged = run(pipe)
        layers = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
        for m in layers:
            m.merge()
        with enable_guidance(pipe, negative_prompt="snow", scale=1.0):
            merged = run(pipe)
        for m in layers:
            m.unmerge()
        transformer.disable_adapters()
        with enable_guidance(pipe, negative_prompt="snow", scale=1.0):
            without = run(pipe)
    finally:
        transformer.delete_adapters("test")
    assert rel(unmerged, merged) < 1e-4, rel(unmerged, merged)
    assert rel(unmerged, without) > 1e-3


def test_bad_input_is_one_line_and_patches_nothing(pipe):
    before = dict(pipe.transformer.attn_processors)

    class NotWan:
        transformer = torch.nn.Linear(2, 2)
    cases = [
        (lambda: enable_guidance(NotWan(), negative_prompt="snow"), "Wan pipeline"),
        (lambda: enable_guidance(pipe, negative_prompt="x" * 600), "over the limit of 512"),
        (lambda: enable_guidance(pipe, negative_prompt="snow", scale=5.0), "out of range for nasa"),
        (lambda: enable_guidance(pipe, negative_prompt="snow", scale=0.5, method="nag"), "out of range for nag"),
        (lambda: enable_guidance(pipe, negative_prompt="snow", scale=float("nan")), "not a finite number"),
        (lambda: enable_guidance(pipe, negative_prompt="snow", method="cfg"), "guidance_scale > 1"),
        (lambda: enable_guidance(pipe, negative_prompt="snow", method="nope"), "unknown guidance"),
        (lambda: enable_guidance(pipe, negative_prompt=["a", "b"], method="vsf", scale=1.0), "at most 1"),
        (lambda: enable_guidance(pipe, negative_prompt="snow", weights=[1.0, 2.0]), "2 weights for 1"),
        (lambda: enable_guidance(pipe, negative_prompt="snow", scale=[]), "empty list"),
    ]
    for make, message in cases:
        with pytest.raises(UserError, match=message) as info:
            make()
        assert "\n" not in str(info.value)
        assert all(before[k] is pipe.transformer.attn_processors[k] for k in before)
        assert getattr(pipe, "_nasa_guidance", None) is None
    with enable_guidance(pipe, scale=1.0):  # over the limit in the call itself: refused before any step
        with pytest.raises(UserError, match="over the limit of 16"):
            run(pipe, negative_prompt="y" * 40)
    with enable_guidance(pipe, negative_prompt="z" * 30, scale=1.0):  # longer than this call's prompt length
        with pytest.raises(UserError, match="max_sequence_length"):
            run(pipe)
    with enable_guidance(pipe, negative_prompt="snow", scale=lambda step: 9.0):  # a function's value out of range
        with pytest.raises(UserError, match="out of range"):
            run(pipe)


@pytest.mark.parametrize("last_image", [False, True], ids=["image-to-video", "first-last-frame"])
def test_image_to_video_pipeline(pipe, last_image):
    """diffusers' WanImageToVideoPipeline: the image tokens lead attn2's context (two images' worth, merged by the
    image embedder, for first-last-frame) and attend as diffusers does; only the text part is guided."""
    import numpy as np
    from diffusers import WanImageToVideoPipeline
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(2)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=4, projection_dim=4, num_hidden_layers=2,
                                                            num_attention_heads=2, image_size=8, intermediate_size=16,
                                                            patch_size=1)).eval()
    extra = dict(pos_embed_seq_len=2 * (8 * 8 + 1)) if last_image else {}
    i2v = WanImageToVideoPipeline(transformer=tiny_transformer(image_dim=4, in_channels=36, added_kv_proj_dim=24,
                                                               **extra),
                                  vae=pipe.vae, scheduler=pipe.scheduler, text_encoder=pipe.text_encoder,
                                  tokenizer=pipe.tokenizer, image_encoder=vision,
                                  image_processor=CLIPImageProcessor(crop_size=8, size=8))

    def image(seed):
        return Image.fromarray((np.random.default_rng(seed).random((16, 16, 3)) * 255).astype("uint8"))
    images = dict(image=image(0), last_image=image(1)) if last_image else dict(image=image(0))

    def call():  # diffusers' image-to-video processor assumes 512 text tokens
        return run(i2v, max_sequence_length=512, **images)
    plain = call()
    with enable_guidance(i2v, negative_prompt="snow", scale=0.0):
        assert torch.equal(call(), plain)
    # a vanishing alpha runs the guided path: it must give diffusers' own result, image branch and split included
    with enable_guidance(i2v, negative_prompt="snow", scale=1e-9) as handle:
        tiny = call()
        assert handle.text_tokens == 512
    assert rel(tiny, plain) < 1e-5, f"the guided path at alpha 1e-9 is {rel(tiny, plain):.2e} from diffusers' own"
    with enable_guidance(i2v, negative_prompt="snow", scale=1.0):
        guided = call()
    assert rel(guided, plain) > 1e-3


def test_the_sum_of_weighted_negatives_is_bounded(pipe):
    with pytest.raises(UserError, match="subtract 8 in all"):
        enable_guidance(pipe, negative_prompt=["snow", "blur", "fog", "rain"], scale=2.0)
    assert getattr(pipe, "_nasa_guidance", None) is None
