"""gsstudio_ext: Gaussian Splatting research methods as nerfstudio plugins."""

__version__ = "0.1.0"
