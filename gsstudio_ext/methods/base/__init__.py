"""The feature-splatting base model shared by all methods, and its trainer-config factory."""
