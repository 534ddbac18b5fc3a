"""shape_cache: an evicted signature's compiled executable is freed (counted among the
backend's live executables), so memory under a cap does not grow with distinct shapes."""

import gc

import jax
import numpy as np
import pytest

from align_jax.generate import shape_cache


@pytest.fixture()
def cap_of_two():
    before = shape_cache.max_programs()
    shape_cache.set_max_programs(2)
    yield
    shape_cache.set_max_programs(before)


def _scaled_and_shifted(x_BT):
    return x_BT * 2.0 + 1.0


def _live(name: str) -> int:
    """Live executables of the backend compiled from a function named `name`."""
    gc.collect()
    return sum(e.hlo_modules()[0].name == f"jit_{name}"
               for e in jax.devices()[0].client.live_executables())


def test_evicted_shapes_free_their_executables(cap_of_two):
    fn = shape_cache.ShapeCache(_scaled_and_shifted)
    name = _scaled_and_shifted.__name__
    # numpy inputs: an eager jnp op would compile (and keep) its own program per shape.
    for n in range(1, 9):
        out = fn(np.ones((1, n), np.float32))
        np.testing.assert_array_equal(np.asarray(out), np.full((1, n), 3.0, np.float32))
        assert _live(name) <= 2, f"after {n} shapes"
    # The two kept signatures hold one executable each (the count sees them).
    assert shape_cache.stats()["programs"] == 2 and _live(name) == 2
    shape_cache.set_max_programs(1)
    assert _live(name) == 1
