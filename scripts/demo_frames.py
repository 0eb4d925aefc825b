"""The bundled model's demo frames as one PNG: for a few of the removal benchmark's prompt pairs, every third frame
with no guidance and with NASA at the model's scale, the detector's verdict beside each row.

    .venv/bin/python scripts/demo_frames.py [--out nasa_video/toy/weights/demo_frames.png] [--pairs 4] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="nasa_video/toy/weights/demo_frames.png")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zoom", type=int, default=3)
    args = parser.parse_args()

    from PIL import Image, ImageDraw

    from nasa_video.pipeline import StreamingGenerator
    from nasa_video.toy.judge import judge_caption
    from nasa_video.toy.removal import benchmark_rows

    gen = StreamingGenerator.from_config("toy", device="cpu")
    scale = float(gen.cfg.guidance.scale)
    rows, captions = [], []
    for row in [r for r in benchmark_rows() if r.kind == "object"][:args.pairs]:
        positive, negative = row.positive, row.negatives[0]
        for method in ("none", "nasa"):
            frames = np.concatenate([c.frames for c in gen.stream(positive, negative, scale, method, seed=args.seed)])
            verdict = judge_caption(frames, positive, [negative])
            rows.append(np.concatenate(list(frames[::3]), 1))
            tag = "none" if method == "none" else f"NASA {scale:g}"
            captions.append(f"{tag}: {positive}  -  negative: {negative}  |  removed {verdict['removed']:.0f}, "
                            f"kept {verdict['kept']:.0%}, joint {verdict['joint']:.0f}")
    zoom, text_h = args.zoom, 14
    width = rows[0].shape[1] * zoom
    sheet = Image.new("RGB", (max(width, 560), len(rows) * (rows[0].shape[0] * zoom + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for row, caption in zip(rows, captions):
        draw.text((2, y + 1), caption, fill="black")
        y += text_h
        sheet.paste(Image.fromarray(row).resize((width, row.shape[0] * zoom), Image.NEAREST), (0, y))
        y += row.shape[0] * zoom
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.partial.png")
    sheet.save(tmp)
    os.replace(tmp, out)
    print(f"wrote {out}: {len(rows)} rows (frames 0, 3, 6, 9)")


if __name__ == "__main__":
    main()
