"""The shard tasks of the one sharded runner (``fae_pipe.cache.shards``), side by side.

A task turns one storage shard's sample range into that shard's arrays; the runner
does the rest (lock, whole-shard writes, completion records, resume, dask). Tasks
hold only paths and settings, so they pickle to dask workers; ``setup`` builds the
model once per worker process. One module per task, so a stage's code dependencies
(dvc.yaml) are exactly its own task's.

- ``features.FeatureExtractTask`` (``extract``): images -> frozen encoder tokens.
- ``latents.EncodeTask`` (``encode``): feature shards -> FAE latent shards + moments.
- ``text.EmbedTextTask`` (``embed-text``): index captions -> text-encoder token embeddings, lengths, pooled.
"""
