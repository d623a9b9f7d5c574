"""Test configuration. Fixtures live in tests/plugins/ (one module per area)."""

pytest_plugins = [
    "tests.plugins.paths",
    "tests.plugins.infra",
    "tests.plugins.standin",
    "tests.plugins.vllm_pair",
]
