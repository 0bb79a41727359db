"""Frozen image encoders: timm ViTs (DINOv2, DINOv3, SigLIP/SigLIP2, any timm ViT); the family table is ``registry``."""
