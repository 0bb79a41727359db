"""Models, one per file, and a registry of named configs."""
