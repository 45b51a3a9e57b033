"""ParallelConfig: parsing of --tensor-parallel / --split-layers, and the refusals before anything is loaded."""
import dataclasses
import os

import pytest
import torch

from mtpx.config import ModelConfig
from mtpx.errors import RequestError
from mtpx.parallel.config import ParallelConfig

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cfg(dense_ckpt):
    from mtpx.loading import load_checkpoint
    return load_checkpoint(dense_ckpt).config


def test_parse():
    assert ParallelConfig.parse(None, None) == ParallelConfig()
    assert not ParallelConfig.parse(1, "1").enabled
    assert ParallelConfig.parse(2).world == 2 and ParallelConfig.parse(2).kind == "tensor"
    assert ParallelConfig.parse(None, "2").stages == (1.0, 1.0)
    assert ParallelConfig.parse(None, "3,1").stages == (3.0, 1.0)
    for bad, flag in [((0, None), "--tensor-parallel"), ((None, "a,b"), "--split-layers"),
                      ((None, "1,-1"), "--split-layers"), ((2, "2"), "not both")]:
        with pytest.raises(RequestError, match=flag):
            ParallelConfig.parse(*bad)


def test_layer_ranges_follow_the_proportions():
    assert ParallelConfig(stages=(1.0, 1.0)).layer_ranges(4) == [(0, 2), (2, 4)]
    assert ParallelConfig(stages=(3.0, 1.0)).layer_ranges(64) == [(0, 48), (48, 64)]
    assert ParallelConfig(stages=(100.0, 1.0, 1.0)).layer_ranges(4) == [(0, 2), (2, 3), (3, 4)]  # >= 1 layer each


def test_refusals_name_the_problem(cfg):
    ParallelConfig(tensor=2).check(cfg, CPU)  # the test model's heads and sizes are even
    odd = dataclasses.replace(cfg, num_key_value_heads=3)
    with pytest.raises(RequestError, match="must divide the model's num_key_value_heads=3"):
        ParallelConfig(tensor=2).check(odd, CPU)
    with pytest.raises(RequestError, match="CPU ranks need at least"):
        stages = len(os.sched_getaffinity(0)) + 1
        ParallelConfig(stages=(1.0,) * stages).check(dataclasses.replace(cfg, num_hidden_layers=stages), CPU)
    with pytest.raises(RequestError, match="5 stages; the model has 4 layers"):
        ParallelConfig(stages=(1.0,) * 5).check(cfg, CPU)
    glm = dataclasses.replace(cfg, model_type="glm4_moe")
    with pytest.raises(RequestError, match="Qwen3.5 family.*glm4_moe"):
        ParallelConfig(tensor=2).check(glm, CPU)

