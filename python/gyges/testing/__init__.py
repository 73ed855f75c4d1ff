"""Test and demo support: tiny local checkpoints and real-server launch helpers."""
