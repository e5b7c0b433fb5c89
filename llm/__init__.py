"""tessera.llm."""
