"""The bundled small world: procedural videos of coloured shapes, their captions, a pixel detector, a tiny
text encoder, and the training that produces the shipped weights."""
