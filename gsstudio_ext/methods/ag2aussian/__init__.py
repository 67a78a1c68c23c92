"""ag2aussian-ext: instance + language feature splatting on anchor-structured Gaussians (AG2aussian, ICCV 2025)."""
