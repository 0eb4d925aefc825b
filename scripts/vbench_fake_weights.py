"""Write random stand-ins for the weight files vbench loads for aesthetic_quality and imaging_quality, in the
layout of $VBENCH_CACHE_DIR, so the real vbench code path runs offline (scores are meaningless).
Run with the vbench environment's python:  python scripts/vbench_fake_weights.py CACHE_DIR"""
import os
import sys

import torch

cache = sys.argv[1]
os.makedirs(f"{cache}/clip_model", exist_ok=True)
os.makedirs(f"{cache}/aesthetic_model/emb_reader", exist_ok=True)
os.makedirs(f"{cache}/pyiqa_model", exist_ok=True)

from clip.model import CLIP  # noqa: E402  (openai-clip: clip.load rebuilds any size from a state dict)

torch.manual_seed(0)
small = CLIP(embed_dim=768, image_resolution=224, vision_layers=1, vision_width=64, vision_patch_size=14,
             context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
# clip.load reads a TorchScript archive first (OpenAI ships traced models) and rebuilds from its state dict
traced = torch.jit.trace(small.eval(), (torch.zeros(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)),
                         check_trace=False)
traced.save(f"{cache}/clip_model/ViT-L-14.pt")
torch.save(torch.nn.Linear(768, 1).state_dict(), f"{cache}/aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth")

from pyiqa.archs.musiq_arch import MUSIQ  # noqa: E402

torch.save(MUSIQ(pretrained=False).state_dict(), f"{cache}/pyiqa_model/musiq_spaq_ckpt-358bb6af.pth")
print("fake vbench weights in", cache)
