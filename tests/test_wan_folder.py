"""The real-model loading path (weights.source: wan) offline: a Diffusers-format Wan folder and a CausVid
model.pt, both tiny and written here, go through exactly the code that loads Wan2.1-T2V-1.3B and CausVid."""
import torch
from omegaconf import OmegaConf

from nasa_video.loading import CONFIG_DIR
from nasa_video.model.checkpoint import save_generator
from nasa_video.pipeline import StreamingGenerator


def make_wan_folder(root, tiny_generator):
    from transformers import ByT5Tokenizer
    tiny_generator.vae.save_pretrained(root / "vae")
    tiny_generator.text.encoder.save_pretrained(root / "text_encoder")
    ByT5Tokenizer().save_pretrained(root / "tokenizer")
    return root


def test_causvid_layout_and_wan_folder_load_and_stream(tmp_path, tiny_generator):
    wan = make_wan_folder(tmp_path / "Wan2.1-T2V-tiny-Diffusers", tiny_generator)
    checkpoint = tmp_path / "model.pt"
    save_generator(tiny_generator.model.state_dict(), checkpoint, "causvid")
    cfg = OmegaConf.load(CONFIG_DIR / "tiny.yaml")
    cfg.name, cfg.weights = "tiny-causvid", OmegaConf.create({"source": "wan", "wan": None, "checkpoint": None,
                                                              "text_max_length": 64})
    config_path = tmp_path / "tiny_causvid.yaml"
    OmegaConf.save(cfg, config_path)

    gen = StreamingGenerator.from_config(str(config_path), str(checkpoint), str(wan), "cpu", "fp32", "sdpa")
    for a, b in zip(gen.model.state_dict().values(), tiny_generator.model.state_dict().values()):
        assert torch.equal(a, b)
    prompt, negative = "a red circle and a blue square", "red circle"
    loaded = list(gen.stream(prompt, negative, decode=True))
    reference = list(tiny_generator.stream(prompt, negative, decode=True))
    for a, b in zip(loaded, reference):
        torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
        assert (a.frames == b.frames).all()
