import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def close_figures():
    """Close every figure a plot test made, so figures do not pile up across tests."""
    yield
    plt.close("all")
