"""The two ways FL units run (fltuning.layers): the side branch beside the frozen FFN (the fast path, used where the
architecture table names the activation) and the widened projections (the generic path) compute the same function
and the same gradients, on every architecture of the table."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from arch_zoo import ARCH_IDS, ARCHS, perturb_fl

from fltuning.config import FLTuningConfig
from fltuning.layers import FLDown, FLUp
from fltuning.model import get_fl_model

SIDE_BRANCH_ARCHS = {"bert", "roberta", "xlm-roberta", "roformer", "distilbert", "albert", "gpt2", "llama", "qwen2"}


def _use_widened(fl_model) -> None:
    for module in fl_model.modules():
        if isinstance(module, FLUp | FLDown):
            module.side_branch = None


def _logits_and_grads(fl_model, inputs):
    fl_model.zero_grad(set_to_none=True)
    out = fl_model(**inputs).logits
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in fl_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_side_branch_and_widened_paths_agree_in_outputs_and_gradients(arch):
    fm = get_fl_model(arch.build(), FLTuningConfig(num_units=5))
    fm.add_adapter("second", FLTuningConfig(num_units=3))
    fm.set_adapter(["default", "second"])  # two active adapters: each gets its own branch
    perturb_fl(fm)
    downs = [m for m in fm.modules() if isinstance(m, FLDown)]
    assert all((d.side_branch is not None) == (arch.name in SIDE_BRANCH_ARCHS) for d in downs)
    inputs = arch.inputs()
    side_out, side_grads = _logits_and_grads(fm, inputs)
    _use_widened(fm)
    wide_out, wide_grads = _logits_and_grads(fm, inputs)
    torch.testing.assert_close(side_out, wide_out, atol=1e-5, rtol=1e-5)
    assert side_grads.keys() == wide_grads.keys()
    for name in side_grads:
        torch.testing.assert_close(side_grads[name], wide_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_side_branch_up_keeps_the_base_width_and_hands_its_units_over_once():
    fm = get_fl_model(ARCHS[0].build(), FLTuningConfig(num_units=5))
    layer = fm.base_model.bert.encoder.layer[0]
    up, down = layer.intermediate.dense, layer.output.dense
    assert up(torch.randn(2, 3, 32)).shape == (2, 3, 64)
    assert down(torch.randn(2, 3, 64)).shape == (2, 3, 32)
    with pytest.raises(RuntimeError, match="down projection ran without its up projection"):
        down(torch.randn(2, 3, 64))


def test_side_branch_hands_units_over_per_thread():
    """nn.DataParallel runs replicas in threads (their attributes still point at the original modules): an FFN
    started in one thread must finish with its own units even when another thread uses the same FFN meanwhile."""
    fm = get_fl_model(ARCHS[0].build(), FLTuningConfig(num_units=5))
    perturb_fl(fm)
    layer = fm.base_model.bert.encoder.layer[0]
    ffn = lambda x: layer.output.dense(layer.intermediate(x))  # noqa: E731
    x1, x2 = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        expected1, expected2 = ffn(x1), ffn(x2)
        with ThreadPoolExecutor(max_workers=1) as worker:  # one thread for both of its calls
            h1 = worker.submit(layer.intermediate, x1).result()
            got2 = ffn(x2)  # this thread, between the other thread's up and down
            got1 = worker.submit(layer.output.dense, h1).result()
    torch.testing.assert_close(got1, expected1)
    torch.testing.assert_close(got2, expected2)
