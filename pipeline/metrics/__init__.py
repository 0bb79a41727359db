"""Metrics: Frechet distances, precision/recall, image metrics, linear probes.

Submodules are imported on demand (``fae_pipe.metrics.frechet``, ``.prdc``,
``.image``, ``.inception``, ``.probe``, ``.weights``) so that importing the
package does not pull in lpips or pytorch-fid. See docs/metrics.md.
"""
