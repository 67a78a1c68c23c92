"""Clear errors for pretrained weights that are not on this machine.

Every provider resolves its weights before handing them to a library, so a missing file surfaces as one
:class:`MissingWeightsError` naming the weight, where it was looked for, and how to obtain it, instead of a
traceback from deep inside open_clip, transformers or segment_anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

PathLike = Union[str, os.PathLike]


class MissingWeightsError(RuntimeError):
    """Pretrained weights needed by a model provider are missing (or could not be downloaded)."""

    def __init__(self, weight: str, looked_in: Union[str, Sequence[str]], how: str, reason: str = "") -> None:
        self.weight = weight
        self.looked_in = [looked_in] if isinstance(looked_in, str) else [str(p) for p in looked_in]
        self.how = how
        self.reason = reason
        lines = [f"Missing pretrained weights: {weight}", f"  looked in: {', '.join(self.looked_in) or '(nowhere)'}"]
        if reason:
            lines.append(f"  reason: {reason}")
        lines.append(f"  how to obtain: {how}")
        super().__init__("\n".join(lines))


def looks_like_path(name: str) -> bool:
    """True when ``name`` is meant as a filesystem path rather than a hub id (absolute, ./, ~, or a file suffix)."""
    s = str(name)
    return (
        os.path.isabs(s)
        or s.startswith((".", "~"))
        or s.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))
        or os.path.exists(os.path.expanduser(s))
    )


def require_path(path: PathLike, *, weight: str, how: str, is_dir: bool = False) -> Path:
    """Return ``path`` (user-expanded) if it exists as a file (or a folder when ``is_dir``), else raise.

    Raises:
        MissingWeightsError: naming ``weight``, the path looked at and ``how`` to obtain it.
    """
    p = Path(path).expanduser()
    ok = p.is_dir() if is_dir else p.is_file()
    if not ok:
        what = "folder" if is_dir else "file"
        reason = f"no such {what}" if not p.exists() else f"not a {what}"
        raise MissingWeightsError(weight, str(p), how, reason=reason)
    return p


def hf_cache_dir() -> str:
    """The Hugging Face hub cache folder used by transformers/open_clip (for messages)."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - huggingface_hub always ships with transformers
        return os.path.expanduser("~/.cache/huggingface/hub")
