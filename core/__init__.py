"""tessera.core."""
