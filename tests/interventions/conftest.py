import pytest
from intervention_helpers import make_module


@pytest.fixture
def module():
    """A stand-in LightningModule around a real tiny HybridLM (see intervention_helpers.make_module)."""
    return make_module()
