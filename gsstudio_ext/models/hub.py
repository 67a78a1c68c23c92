"""Loading a Hugging Face model or processor from the local cache or a folder, offline unless allowed, with missing
weights reported as :class:`MissingWeightsError` (shared by the BERT text encoder and Grounding DINO)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from gsstudio_ext.models.errors import MissingWeightsError, hf_cache_dir, looks_like_path, require_path


def hub_how(name: str, config_name: str) -> str:
    """How to make hub model ``name`` available offline (``config_name``: the config class users set)."""
    return (
        f"run `huggingface-cli download {name}` (https://huggingface.co/{name}) on a machine with network, then copy "
        f"the HF cache here; or set {config_name}.model_name_or_path to a local folder (e.g. saved with "
        f"save_pretrained); or set {config_name}.allow_download=True"
    )


def from_pretrained(cls: Any, name: str, allow_download: bool, cache_dir: Optional[Path], how: str) -> Any:
    """``cls.from_pretrained`` of a hub id (local cache only unless ``allow_download``) or of a local folder (which
    must exist); any loading failure becomes MissingWeightsError naming where it looked and ``how`` to fix it."""
    source, local_only = name, not allow_download
    if looks_like_path(name):
        source = str(require_path(name, weight=f"transformers model folder {name}", how=how, is_dir=True))
        local_only = True
    cache = str(cache_dir) if cache_dir is not None else None
    try:
        return cls.from_pretrained(source, local_files_only=local_only, cache_dir=cache)
    except (OSError, ValueError) as err:
        where = source if looks_like_path(name) else (cache or hf_cache_dir())
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MissingWeightsError(name, where, how, reason=reason) from err
