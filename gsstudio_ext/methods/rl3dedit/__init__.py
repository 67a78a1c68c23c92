"""RL3DEdit: single-pass multi-view-consistent 3DGS editing with a geometry-verified, RL-tuned 2D editor."""
