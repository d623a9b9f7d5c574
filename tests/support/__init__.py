"""Test support code that runs outside pytest too (the stand-in engine is stdlib-only)."""
