"""CLIP over video frames: CLIP+ / CLIP- (alignment with the positive / negative prompt) and a zero-shot
judge for removal on real models (its pairs and rule: removal.py).

Model: openai/clip-vit-large-patch14 (transformers CLIPModel) read from a local folder: --clip PATH, else
$NASA_VIDEO_CLIP, else ~/.cache/nasa-video/clip-vit-large-patch14. Nothing is downloaded.

Judge: for a pair (negative concept, contrast concept) each frame is scored with CLIP's zero-shot softmax
over "a photo of {negative}" and "a photo of {contrast}"; the frame shows the negative when its probability
is above the threshold (0.5 unless calibrated on frames whose answer is known). The prompt's subject is
judged the same way, against "a photo of an empty scene", with its own threshold: two-way softmaxes compare
texts on one frame, so neither verdict depends on CLIP's absolute similarity scale. A video counts as a
removal success when at most 10% of its frames show the negative and at most 10% lack the subject (removal.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

CLIP_FILES = ("config.json", "preprocessor_config.json", "vocab.json", "merges.txt")
DEFAULT_CLIP = Path.home() / ".cache" / "nasa-video" / "clip-vit-large-patch14"
EMPTY_SCENE = "an empty scene"  # the subject's contrast: what a frame without it shows


def clip_folder(path: str | os.PathLike | None = None) -> Path:
    folder = Path(path or os.environ.get("NASA_VIDEO_CLIP") or DEFAULT_CLIP)
    missing = [f for f in CLIP_FILES if not (folder / f).exists()]
    if not any((folder / w).exists() for w in ("model.safetensors", "pytorch_model.bin")):
        missing.append("model.safetensors")
    if missing:
        raise UserError(f"CLIP weights missing in {folder}: {', '.join(missing)}. Put the files of "
                        f"openai/clip-vit-large-patch14 there (e.g. huggingface-cli download "
                        f"openai/clip-vit-large-patch14 --local-dir {folder}) or pass --clip PATH / set NASA_VIDEO_CLIP")
    return folder


def _features(output) -> torch.Tensor:
    """transformers 4 returns the projected embeddings; 5 returns an output whose pooler_output holds them."""
    return output if torch.is_tensor(output) else output.pooler_output


class ClipScorer:
    def __init__(self, path: str | os.PathLike | None = None, device: str = "cpu"):
        folder = clip_folder(path)  # a missing file fails before transformers is imported
        from transformers import CLIPModel, CLIPTokenizer

        try:  # transformers 5: the Pillow processor (torchvision is not part of this install)
            from transformers import CLIPImageProcessorPil as CLIPImageProcessor
        except ImportError:
            from transformers import CLIPImageProcessor
        self.folder = folder
        self.model = CLIPModel.from_pretrained(folder).to(device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        self.processor = CLIPImageProcessor.from_pretrained(folder)
        self.device = device

    @torch.no_grad()
    def image_embeddings(self, frames: np.ndarray, batch: int = 32) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> unit vectors [T, D]."""
        out = []
        for i in range(0, len(frames), batch):
            pixels = self.processor(images=list(frames[i:i + batch]), return_tensors="pt")["pixel_values"]
            out.append(_features(self.model.get_image_features(pixel_values=pixels.to(self.device))))
        features = torch.cat(out).float()
        return features / features.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        features = _features(self.model.get_text_features(**tokens)).float()
        return features / features.norm(dim=-1, keepdim=True)

    def clip_plus_minus(self, frames: np.ndarray, positive: str, negative: str) -> dict:
        """Mean over frames of the cosine similarity (x100, as CLIPScore is usually quoted) with each prompt."""
        return self._clip_plus_minus(self.image_embeddings(frames), positive, negative)

    def negative_probability(self, frames: np.ndarray, negative: str, contrast: str) -> np.ndarray:
        """Per frame, CLIP's zero-shot probability of the negative concept against the contrast concept."""
        return self._zero_shot(self.image_embeddings(frames), negative, contrast)

    def subject_probability(self, frames: np.ndarray, subject: str) -> np.ndarray:
        """Per frame, CLIP's zero-shot probability of the subject against an empty scene."""
        return self._zero_shot(self.image_embeddings(frames), subject, EMPTY_SCENE)

    def video_scores(self, frames: np.ndarray, positive: str, negative: str, contrast: str, subject: str) -> dict:
        """All the judge reads of one video, from one pass of the image encoder (its costly part)."""
        images = self.image_embeddings(frames)
        return {"negative": self._zero_shot(images, negative, contrast),
                "subject": self._zero_shot(images, subject, EMPTY_SCENE),
                **self._clip_plus_minus(images, positive, negative)}

    def _clip_plus_minus(self, images: torch.Tensor, positive: str, negative: str) -> dict:
        sims = 100 * images @ self.text_embeddings([positive, negative]).T
        return {"clip_plus": float(sims[:, 0].mean()), "clip_minus": float(sims[:, 1].mean())}

    @torch.no_grad()
    def _zero_shot(self, images: torch.Tensor, concept: str, contrast: str) -> np.ndarray:
        texts = self.text_embeddings([f"a photo of {concept}", f"a photo of {contrast}"])
        logits = self.model.logit_scale.exp().float() * images @ texts.T
        return logits.softmax(-1)[:, 0].cpu().numpy()


def calibrate(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """The threshold that best separates frames known to show the negative (labels True) from frames known
    not to; returns it with its agreement and the agreement at 0.5."""
    probabilities, labels = np.asarray(probabilities, float), np.asarray(labels, bool)
    if len(probabilities) == 0 or labels.all() or not labels.any():
        raise UserError("calibration needs frames of both kinds (showing and not showing the concept)")
    candidates = np.unique(np.concatenate([[0.5], probabilities]))
    scores = [float(((probabilities > c) == labels).mean()) for c in candidates]
    best = int(np.argmax(scores))
    return {"threshold": float(candidates[best]), "agreement": scores[best],
            "agreement_at_0.5": float(((probabilities > 0.5) == labels).mean()), "frames": int(len(labels))}


# What each kind of labelled frame names: the negative judge's (--threshold) or the subject judge's.
LABEL_KEYS = {"negative": ("image", "negative", "contrast", "shows"), "subject": ("image", "subject", "present")}


def read_labels(labels: str | os.PathLike, judge: str = "negative") -> list[dict]:
    """The labelled frames for one judge, each checked for the keys that judge needs."""
    path, keys = Path(labels), LABEL_KEYS[judge]
    if not path.is_file():
        raise UserError(f"labels file not found: {path}")
    items = json.loads(path.read_text())
    for n, item in enumerate(items if isinstance(items, list) else [None]):
        if not isinstance(item, dict) or any(k not in item for k in keys):
            raise UserError(f"{path}: item {n} lacks one of {', '.join(keys)} (what the {judge} judge's "
                            f"calibration reads)")
    return items


def calibrate_labels(scorer: ClipScorer, labels: str | os.PathLike, judge: str = "negative") -> dict:
    """calibrate() on a JSON file of frames whose answer is known, for the negative judge:
    [{"image": path, "negative": "cat", "contrast": "dog", "shows": true}, ...], or the subject judge:
    [{"image": path, "subject": "a pet", "present": true}, ...]; "option" names the flag that takes the result."""
    from PIL import Image

    def probability(item) -> float:
        frame = np.asarray(Image.open(item["image"]).convert("RGB"))[None]
        if judge == "subject":
            return float(scorer.subject_probability(frame, item["subject"])[0])
        return float(scorer.negative_probability(frame, item["negative"], item["contrast"])[0])

    items = read_labels(labels, judge)
    answer = "present" if judge == "subject" else "shows"
    result = calibrate(np.array([probability(i) for i in items]), np.array([bool(i[answer]) for i in items]))
    return {**result, "option": "--subject-threshold" if judge == "subject" else "--threshold"}


class ClipMetric:
    """CLIP+ / CLIP- of every finished video of a run folder (prompt and negative from its sidecar), averaged
    per method label."""

    name = "clip"

    def __init__(self, scorer: ClipScorer):
        self.scorer = scorer

    def score(self, run: str | os.PathLike) -> dict:
        from ..video_io import read_video

        rows: dict[str, list[dict]] = {}
        for sidecar in sorted(Path(run).glob("videos/*/*.json")):
            job = json.loads(sidecar.read_text())
            scores = self.scorer.clip_plus_minus(read_video(sidecar.with_suffix(".mp4")), job["prompt"],
                                                 job["negative"])
            rows.setdefault(sidecar.parent.name, []).append(scores)
        if not rows:
            raise UserError(f"no finished videos under {run}/videos")
        methods = {label: {"videos": len(v), "clip_plus": float(np.mean([x["clip_plus"] for x in v])),
                           "clip_minus": float(np.mean([x["clip_minus"] for x in v]))} for label, v in rows.items()}
        return {"clip": str(self.scorer.folder), "methods": methods}


def clip_summary(result: dict) -> str:
    """ClipMetric's result, one line per method."""
    return "\n".join(f"{label}: CLIP+ {r['clip_plus']:.2f}  CLIP- {r['clip_minus']:.2f}  ({r['videos']} videos)"
                     for label, r in result["methods"].items())
