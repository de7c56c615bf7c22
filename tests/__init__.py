"""flashmath's tests, a package: shared helpers import as `from tests.X import ...`."""
