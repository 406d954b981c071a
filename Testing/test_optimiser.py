"""The registration-time Adam takes torch.optim.Adam's steps (without importing torch._dynamo)."""

import subprocess
import sys

import torch

from ACSGRegistrationLib.optimiser import Adam


def test_same_steps_as_torch_adam_with_parameter_groups():
    torch.manual_seed(0)
    ours = [torch.randn(5, requires_grad=True), torch.randn(2, 3, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_(True) for p in ours]
    groups = lambda ps: [{"params": [ps[0]], "lr": 0.05}, {"params": [ps[1]], "lr": 0.002}]  # noqa: E731
    optimisers = (Adam(groups(ours)), torch.optim.Adam(groups(theirs)))
    for _ in range(40):
        for optimiser, (a, b) in zip(optimisers, (ours, theirs)):
            optimiser.zero_grad(set_to_none=True)
            ((a ** 4).sum() + (b.sin() * a[:2, None]).sum()).backward()
            optimiser.step()
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-7)
    assert not torch.equal(ours[0], torch.zeros(5))


def test_a_registration_step_leaves_torch_dynamo_unimported():
    code = ("import sys, torch; from ACSGRegistrationLib.optimiser import Adam; p = torch.ones(3, requires_grad=True);"
            "o = Adam([p], lr=0.1); (p ** 2).sum().backward(); o.step(); print('torch._dynamo' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip() \
        == "False"
