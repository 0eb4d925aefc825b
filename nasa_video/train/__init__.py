"""Distillation of block-causal few-step students: CausVid's two stages with NASA-T (dmd.py), torchrun helpers
(distributed.py)."""
