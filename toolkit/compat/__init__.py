"""Compatibility layers for optional third-party stacks (DGL)."""
