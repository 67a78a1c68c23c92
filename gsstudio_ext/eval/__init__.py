"""Evaluation protocols, each named after the protocol it reproduces, and report writers."""
