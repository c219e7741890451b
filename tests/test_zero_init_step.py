"""Zero init at step one: with every gate at 0 the prompt's gradient is exactly zero and only the gates move.

Every path from the loss to a prompt passes through g * O_a, so dL/dprompt is proportional to g (docs/design.md
§1). A newcomer stepping through the first training step sees the prompt gradient 0: this is zero-init working,
not a bug. Checked on the reference backend and on the Triton kernels under the interpreter (conftest), on the
tiny model with the adapter on both layers; after one SGD step the gates are non-zero and the prompts then get a
gradient.
"""

import pytest
import torch
import torch.nn.functional as F
from train_helpers import tiny_model

from llama_adapter.attention import set_attention_backend


def _prompts_and_gates(model):
    named = dict(model.named_parameters())
    prompts = [p for n, p in named.items() if n.endswith("adapter_prompt")]
    gates = [p for n, p in named.items() if n.endswith("adapter_gate")]
    assert len(prompts) == len(gates) == model.params.n_layers
    return prompts, gates


def _backward(model, tokens):
    model.zero_grad(set_to_none=True)
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_step_one_moves_only_the_gates(backend):
    model = tiny_model(seed=3, adapter_len=5, adapter_layers=2)
    prompts, gates = _prompts_and_gates(model)
    assert all(torch.count_nonzero(g) == 0 for g in gates) and all(p.abs().max() > 0 for p in prompts)
    tokens = torch.randint(0, model.params.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    set_attention_backend(backend)  # conftest restores the previous one
    _backward(model, tokens)
    for p, g in zip(prompts, gates, strict=True):
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, "prompt gradient at gate 0 must be 0"
        assert g.grad.abs().min() > 0, "every gate gets a gradient at step one"

    before = [p.detach().clone() for p in prompts]
    torch.optim.SGD(prompts + gates, lr=0.5).step()
    assert all(torch.equal(p, b) for p, b in zip(prompts, before, strict=True))
    assert all(g.abs().min() > 0 for g in gates)

    _backward(model, tokens)  # step two: the gates are open, so the prompts learn
    assert all(p.grad.abs().max() > 0 for p in prompts)
