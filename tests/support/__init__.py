"""What the tests share besides fixtures (those are in tests/conftest.py): servers, emulations, data makers, and the
scripts some tests run as their own process."""
