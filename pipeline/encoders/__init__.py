"""Frozen image encoders (DINOv2 through timm)."""
