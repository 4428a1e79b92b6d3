"""Detection fixtures live in tests/conftest.py (the service tests use them too)."""

from conftest import PLATELETS, RBC_D, WHITE, synthetic_smear  # noqa: F401  (re-exported for the tests here)
