"""Metrics: Frechet distances, precision/recall, image metrics, linear probes."""
