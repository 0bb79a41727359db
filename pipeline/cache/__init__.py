"""The zarr cache: schema (the contract), sharded writing, inspection."""
