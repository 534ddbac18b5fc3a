"""One provenance writer: a run folder's run_info.json keeps what the train loop adds."""

import json

import jax
from train_fixtures import CountingIterator, nll_loss, tiny_config

from align_jax import sharding
from align_jax.runinfo import run_folder
from align_jax.train import OptimizerConfig, train


def test_resumed_run_in_a_run_folder_keeps_resumed_from_step(tmp_path):
    workdir = tmp_path / "run"
    kwargs = dict(config=tiny_config(), loss_fn=nll_loss,
                  optimizer=OptimizerConfig(learning_rate=1e-3),
                  mesh_spec=sharding.MeshSpec(data=8), rules="dp", workdir=workdir,
                  save_every=2, log_every=1, progress=False)
    with run_folder(workdir):
        train(data_iterator=CountingIterator(), num_steps=2, **kwargs)
    with run_folder(workdir):
        train(data_iterator=CountingIterator(), num_steps=4, **kwargs)
    info = json.loads((workdir / "run_info.json").read_text())
    # train()'s fields survive run_folder's exit, beside the library versions and commit.
    assert info["resumed_from_step"] == 2 and info["num_steps"] == 4
    assert info["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert info["jax"] == jax.__version__ and "git_commit" in info
    assert (workdir / "operative_config.gin").exists()
