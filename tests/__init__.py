"""The test suite (a package, so its helpers import as tests.tiny and tests.tfserving_stub)."""
