import pytest

from tests.server.engine_helpers import MAX_TOKENS, make_setup


@pytest.fixture(scope="module")
def setup(tiny_checkpoint):
    return make_setup(tiny_checkpoint)


@pytest.fixture(scope="module")
def prompts_and_reference(setup):
    """16 prompts of mixed kinds and the reference path's greedy MAX_TOKENS tokens for each."""
    prompts = setup.prompts(16)
    return prompts, [setup.reference(p, MAX_TOKENS) for p in prompts]
