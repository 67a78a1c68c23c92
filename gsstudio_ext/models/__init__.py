"""Pretrained-model providers: each has a real ("pretrained") backend and a "tiny" random backend for tests."""
