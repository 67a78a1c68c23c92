"""referspat-ext: referring segmentation of Gaussians from natural-language expressions (ReferSplat)."""
