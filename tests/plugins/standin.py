"""Fixtures for stand-in OpenAI-compatible engines (owned by the router work)."""
