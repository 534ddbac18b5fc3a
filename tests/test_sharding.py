"""Sharding: mesh specs, rule presets, sharded init and forward equal to single device."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from align_jax import sharding
from align_jax.models import transformer
from align_jax.models.config import get_config

GOLDEN = pathlib.Path(__file__).parent / "golden" / "param_specs.json"
CFG = get_config("tiny", vocab_size=128)
PRESETS = ("dp", "fsdp", "fsdp_tp")


def test_mesh_spec_fills_the_rest():
    assert sharding.MeshSpec(data=-1, fsdp=2, tensor=2).shape(8) == (2, 2, 2)
    assert sharding.MeshSpec(data=1, fsdp=-1).shape(8) == (1, 8, 1)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.MeshSpec(data=-1, fsdp=3).shape(8)
    with pytest.raises(ValueError, match="at most one"):
        sharding.MeshSpec(data=-1, fsdp=-1).shape(8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.MeshSpec(data=2, fsdp=2).shape(8)


def test_logical_to_spec_uses_each_mesh_axis_once():
    spec = sharding.logical_to_spec(("batch", "embed"), "fsdp")
    # embed wants fsdp, which batch already took.
    assert spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    spec = sharding.logical_to_spec(("embed", "mlp"), "fsdp_tp")
    assert spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    with pytest.raises(ValueError, match="unknown sharding preset"):
        sharding.logical_to_spec(("batch",), "zero3")


def test_experts_claim_their_mesh_axes_before_the_batch():
    mesh = sharding.make_mesh(sharding.MeshSpec(data=2, fsdp=4, tensor=1))
    rules = sharding.get_rules("fsdp")
    logical = ("batch", "experts", None, None)
    P = jax.sharding.PartitionSpec
    # Experts take fsdp (4 of them over 4 devices; data would need 8), rows get data.
    assert sharding._spec_first((8, 4, 3, 5), logical, rules, mesh, ("experts",)) == P(
        "data", "fsdp", None, None)
    # 8 experts take (fsdp, data), the rows nothing: the all-to-all layout of expert parallelism.
    assert sharding._spec_first((8, 8, 3, 5), logical, rules, mesh, ("experts",)) == P(
        None, ("fsdp", "data"), None, None)
    # 3 experts divide by neither axis: they stay whole and the rows keep both batch axes.
    assert sharding._spec_first((8, 3, 3, 5), logical, rules, mesh, ("experts",)) == P(
        ("data", "fsdp"), None, None, None)
    # Expert weights at rest: experts over fsdp, their embed axis whole (fsdp is taken).
    assert sharding.logical_to_spec(("layers", "experts", "embed", "mlp"), "fsdp_tp") == P(
        None, ("fsdp", "data"), None, "tensor")


def _specs(mesh, rules):
    shardings = sharding.tree_shardings(transformer.abstract_params(CFG), mesh, rules)
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {jax.tree_util.keystr(path): [list(e) if isinstance(e, tuple) else e
                                         for e in s.spec] for path, s in flat}


def test_param_specs_match_golden():
    mesh = sharding.make_mesh(sharding.MeshSpec(data=2, fsdp=2, tensor=2))
    got = {rules: _specs(mesh, rules) for rules in PRESETS}
    if os.environ.get("ALIGN_JAX_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        lines = [f'  "{r}": {{' + ",".join(
            f'\n    {json.dumps(k)}: {json.dumps(v)}' for k, v in sorted(got[r].items())) + "}"
            for r in PRESETS]
        GOLDEN.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    want = json.loads(GOLDEN.read_text())
    assert got == want, (
        "parameter PartitionSpecs changed; if intended, rerun with ALIGN_JAX_UPDATE_GOLDEN=1 "
        "and review the diff of tests/golden/param_specs.json")
    # Spot checks that do not depend on the golden file.
    assert got["dp"]["['embedding']"] == [None, None]
    assert got["fsdp"]["['layers']['mlp']['gate']"] == [None, "fsdp", None]
    assert got["fsdp_tp"]["['layers']['attn']['q_proj']"] == [None, "fsdp", "tensor", None]


@pytest.mark.parametrize("rules", PRESETS)
def test_sharded_forward_equals_single_device(rules):
    rng = jax.random.key(0)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (4, 12), 0, CFG.vocab_size))
    seg = np.ones_like(tokens)
    seg[1, :3] = 0
    pos = np.asarray(transformer.positions_from_segments(seg))
    single = transformer.jit_forward(CFG)(transformer.init_params(CFG, rng), tokens, pos, seg)

    mesh = sharding.make_mesh(sharding.MeshSpec(data=2, fsdp=2, tensor=2))
    params = transformer.init_params(CFG, rng, mesh=mesh, rules=rules)
    q = params["layers"]["attn"]["q_proj"]
    assert q.sharding.spec == sharding.tree_shardings(
        transformer.abstract_params(CFG), mesh, rules)["layers"]["attn"]["q_proj"].spec
    fn = transformer.jit_forward(CFG, mesh=mesh, rules=rules)
    out = fn(params, tokens, pos, seg)
    np.testing.assert_allclose(out, single, atol=1e-5)
    assert len(out.sharding.device_set) == 8
    # Same shapes again: no new trace or compilation.
    fn(params, tokens + 1, pos, seg)
    assert fn._cache_size() == 1


@pytest.mark.slow
def test_splash_under_mesh_equals_single_device():
    import dataclasses
    cfg = dataclasses.replace(CFG, attention="splash")
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (4, 16), 0, CFG.vocab_size))
    seg = np.ones_like(tokens)
    pos = np.asarray(transformer.positions_from_segments(seg))
    ref = transformer.jit_forward(CFG)(transformer.init_params(CFG, jax.random.key(0)),
                                       tokens, pos, seg)
    mesh = sharding.make_mesh(sharding.MeshSpec(data=2, fsdp=2, tensor=2))
    params = transformer.init_params(cfg, jax.random.key(0), mesh=mesh, rules="fsdp_tp")
    out = transformer.jit_forward(cfg, mesh=mesh, rules="fsdp_tp")(params, tokens, pos, seg)
    np.testing.assert_allclose(out, ref, atol=1e-4)
