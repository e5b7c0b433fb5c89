"""tessera.modalities."""
