"""The small, stable heart of lorakit: wrappers, injection, registry, files."""
