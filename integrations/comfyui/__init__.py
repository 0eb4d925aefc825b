"""nasa-video's ComfyUI nodes: "NASA negative (Wan)".

Install: link or copy this folder into ComfyUI's custom_nodes/ (as custom_nodes/nasa_video_nodes), with nasa-video
installed in ComfyUI's Python (pip install nasa-video, or pip install -e this repository); a linked folder also
finds the repository it lives in. The node's code is nasa_video.comfyui.
"""
import sys
from pathlib import Path

try:
    from nasa_video.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError:  # linked from a checkout: the repository root is two folders up
    sys.path.append(str(Path(__file__).resolve().parents[2]))
    from nasa_video.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
