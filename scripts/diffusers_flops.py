"""What NASA costs inside diffusers' WanTransformer3DModel, counted by torch's FLOP counter on the meta device
(nothing is allocated, so full size runs on a CPU in seconds): one denoising forward at 480x832, 81 frames,
512 text tokens, plain vs NASA with one negative, at the Wan 2.1 1.3B and 14B sizes.

    .venv/bin/python scripts/diffusers_flops.py
"""
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from torch.utils.flop_counter import FlopCounterMode

from nasa_video.diffusers import enable_guidance

SIZES = {  # Wan 2.1 text-to-video transformers (their published configs)
    "Wan2.1-T2V-1.3B": dict(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "Wan2.1-T2V-14B": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40),
}
LATENT = (1, 16, 21, 60, 104)  # 81 frames at 480x832 through the Wan VAE's (4, 8, 8) strides
TEXT = 512


def forward_flops(transformer) -> int:
    with torch.device("meta"):
        x, context = torch.randn(*LATENT), torch.randn(1, TEXT, 4096)
        t = torch.tensor([500.0])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        transformer(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)
    return counter.get_total_flops()


def main():
    print(f"{'model':18} {'plain TFLOP':>12} {'NASA TFLOP':>11} {'per step':>9} {'negative K/V once per call':>27}")
    for name, size in SIZES.items():
        with torch.device("meta"):
            transformer = WanTransformer3DModel(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16,
                                                out_channels=16, text_dim=4096, freq_dim=256, cross_attn_norm=True,
                                                qk_norm="rms_norm_across_heads", **size).eval()
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
        plain = forward_flops(transformer)
        negative = torch.zeros(1, TEXT, 4096)
        negative[:, :32] = 1.0  # a 32-token negative, zero-padded as Wan's encoder returns it
        with enable_guidance(pipe, negative_prompt_embeds=negative, scale=0.5):
            first = forward_flops(transformer)  # computes the negative K/V (once per pipeline call)
            steady = forward_flops(transformer)  # every later step of the call
        print(f"{name:18} {plain / 1e12:12.2f} {steady / 1e12:11.2f} {steady / plain - 1:+9.2%} "
              f"{(first - steady) / 1e9:21.1f} GFLOP")


if __name__ == "__main__":
    main()
