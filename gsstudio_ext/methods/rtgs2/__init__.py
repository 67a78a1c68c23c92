"""rtgs2-ext: generalizable real-time semantic segmentation of unseen Gaussian scenes (RT-GS2, BMVC 2024)."""
