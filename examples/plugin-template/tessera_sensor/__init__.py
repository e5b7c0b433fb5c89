"""Example third-party Tessera plugin (see docs/plugins.md)."""
