"""Tests that need a CUDA device; marked `gpu` and deselected by default."""
