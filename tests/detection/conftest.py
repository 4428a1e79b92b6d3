"""Detection fixtures live in tests/conftest.py (the service tests use them too); the synthetic
smear itself in tests/smear_images.py."""
