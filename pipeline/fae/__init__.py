"""The FAE around the models: losses, exported files, and the frozen encode/decode object."""
