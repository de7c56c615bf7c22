"""flashmath's tests; a package so that `from tests.mp_oracle import ...` works everywhere."""
