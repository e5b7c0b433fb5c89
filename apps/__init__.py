"""tessera.apps."""
