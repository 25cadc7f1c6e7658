"""runtime.compile: blocks — the compiled DyHead blocks keep the block's numerics (forward and gradients)."""
import copy
from dataclasses import replace

import pytest
import torch

from dyhead.config import resolve
from dyhead.engine.runtime import compile_blocks
from dyhead.modeling.build import build_detector


@pytest.mark.slow
def test_compiled_blocks_match_the_eager_block():
    base = resolve("atss-r50-dyh2-LSC-1x", "tiny")
    run = replace(base, profile={**base.profile, "runtime": {**base.profile["runtime"], "compile": "blocks"}})
    torch.manual_seed(0)
    eager = build_detector(run, 3, "torchvision", load_weights=False).train()
    compiled = copy.deepcopy(eager)
    assert compile_blocks(eager, base) == 0 and compile_blocks(compiled, run) == 2
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 2.0, 60.0, 20.0]]),
                "labels": torch.tensor([1, 2])}] * 2
    losses = []
    for model in (eager, compiled):
        out = model(images, targets)
        sum(out.values()).backward()
        losses.append({k: v.item() for k, v in out.items()})
    for k in losses[0]:
        assert losses[1][k] == pytest.approx(losses[0][k], rel=1e-4, abs=1e-6), k
    grads = [dict((n, p.grad) for n, p in m.named_parameters() if p.grad is not None) for m in (eager, compiled)]
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-3, atol=1e-5, msg=name)
    # the state dict is the eager model's: checkpoints load either way
    assert set(compiled.state_dict()) == set(eager.state_dict())
