"""The bundled world's pieces, registered with the core by name: a config that lists this module under
components.plugins (configs/toy.yaml) gets its exact codec and word-level text encoder. The core never
imports the toy; it imports this module only because the toy's config asks for it."""
from __future__ import annotations

from ..loading import bundled_path, register_codec, register_text_encoder


def _shuffle_codec(cfg, device, dtype, wan):
    from .codec import ShuffleCodec

    return ShuffleCodec.load(bundled_path(cfg, "codec"))


def _toy_text(cfg, device, dtype, wan):
    from .text import load_toy_text_encoder

    return load_toy_text_encoder(bundled_path(cfg, "text"), device)


register_codec("toy-shuffle", _shuffle_codec)
register_text_encoder("toy-words", _toy_text)
