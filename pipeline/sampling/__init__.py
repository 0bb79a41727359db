"""Sampling: trained SiT + FAE decoders -> uint8 images, split over processes, saved as grid and .npz."""
