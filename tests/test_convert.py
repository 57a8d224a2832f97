"""fusedrnn.from_torch_nn / to_torch_nn: swapping the recurrent modules inside a model someone
else wrote (where the import cannot be changed) for fusedrnn's twins, and back."""
import pytest
import torch
import torch.nn.utils.prune
from torch import nn

import fusedrnn

from _helpers import rel_err, requires_native

pytestmark = requires_native


class _Speech(nn.Module):
    """A model as a library writes it: torch.nn RNNs in attributes, a Sequential and a
    ModuleDict, one LSTM held in two places, and a cell run over the sequence."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 6), nn.LSTM(6, 5, num_layers=2,
                                                                bidirectional=True, proj_size=3))
        self.heads = nn.ModuleDict({"gru": nn.GRU(6, 4, batch_first=True),
                                    "elman": nn.RNN(6, 4, nonlinearity="relu", bias=False)})
        self.shared = self.encoder[1]
        self.cells = nn.ModuleList([nn.LSTMCell(6, 4), nn.GRUCell(4, 3), nn.RNNCell(3, 2)])

    def forward(self, x):  # x [T, B, 4]
        encoded, _ = self.encoder(x)
        again, _ = self.shared(encoded.new_zeros(encoded.shape[:2] + (6,)))
        gru, _ = self.heads["gru"](encoded.transpose(0, 1).contiguous())
        elman, _ = self.heads["elman"](encoded)
        h = c = None
        outs = []
        for step in encoded:
            h, c = self.cells[0](step, None if h is None else (h, c))
            outs.append(self.cells[2](self.cells[1](h)))
        return torch.cat([again.flatten(), gru.flatten(), elman.flatten(),
                          torch.stack(outs).flatten()])


def _run(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x)
    torch.manual_seed(1)
    out.mul(torch.randn_like(out)).sum().backward()
    return [out, x.grad] + [p.grad for p in model.parameters()]


def test_swapped_model_computes_what_it_did_and_keeps_its_parameters():
    torch.manual_seed(0)
    model = _Speech().double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    expected = _run(model, x)
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    assert fusedrnn.from_torch_nn(model) is model
    kinds = [type(m) for m in model.modules()]
    assert not any(k in kinds for k in (nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell,
                                        nn.RNNCell))
    assert kinds.count(fusedrnn.LSTM) == 1 and model.shared is model.encoder[1]
    assert isinstance(model.heads["elman"], fusedrnn.RNN) and model.heads["elman"].bias is False
    assert all(a is b for a, b in zip(model.parameters(), parameters))  # the same objects
    assert model.state_dict().keys() == state.keys()
    for got, want in zip(_run(model, x), expected):
        assert rel_err(got, want) <= 1e-12

    optimizer.step()  # the optimizer built before the swap trains the swapped model
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in state.items())

    assert fusedrnn.to_torch_nn(model) is model
    assert type(model.encoder[1]) is nn.LSTM and type(model.cells[1]) is nn.GRUCell
    assert model.shared is model.encoder[1]
    assert all(a is b for a, b in zip(model.parameters(), parameters))


@pytest.mark.parametrize("training", [True, False])
def test_a_module_itself_is_swapped_with_its_mode_and_hooks(training):
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, dropout=0.0).train(training)
    calls = []
    lstm.register_forward_pre_hook(lambda m, args: calls.append(("pre", type(m))))
    lstm.register_forward_hook(lambda m, args, out: calls.append(("post", type(m))))
    lstm.register_full_backward_hook(lambda m, gi, go: calls.append(("backward", type(m))))
    x = torch.randn(2, 1, 3, requires_grad=True)
    expected = lstm(x)[0]
    twin = fusedrnn.from_torch_nn(lstm)
    assert type(twin) is fusedrnn.LSTM and twin.training is training
    calls.clear()
    out = twin(x)[0]
    out.sum().backward()
    assert [c[0] for c in calls] == ["pre", "post", "backward"]
    assert all(kind is fusedrnn.LSTM for _, kind in calls)
    assert rel_err(out, expected) <= 1e-6


def test_subclasses_are_left_alone():
    class MyLSTM(nn.LSTM):  # its forward may do anything
        pass

    model = nn.Sequential(MyLSTM(3, 4))
    assert type(fusedrnn.from_torch_nn(model)[0]) is MyLSTM


def test_what_its_twin_could_not_compute_is_refused_by_name():
    lstm = nn.LSTM(3, 4)
    torch.nn.utils.parametrizations.weight_norm(lstm, "weight_hh_l0")
    with pytest.raises(ValueError, match=r"swap 0 \(torch.nn.modules.rnn.LSTM\): it is parametrized"):
        fusedrnn.from_torch_nn(nn.Sequential(lstm))

    pruned = nn.GRU(3, 4)
    torch.nn.utils.prune.l1_unstructured(pruned, "weight_ih_l0", amount=0.5)
    with pytest.raises(ValueError, match="lose its buffer weight_ih_l0_mask"):
        fusedrnn.from_torch_nn(pruned)

    compiled = torch.compile(nn.Sequential(nn.GRU(3, 4)))
    with pytest.raises(ValueError, match="it is compiled"):  # it would run the old GRU on
        fusedrnn.from_torch_nn(compiled)

    with pytest.raises(ValueError, match="torch.nn has no peephole"):
        fusedrnn.to_torch_nn(fusedrnn.LSTM(3, 4, peephole=True))


def test_back_in_torch_nn_its_tools_apply():
    """The reason to swap back: torch.nn's own tools, e.g. dynamic quantization, which knows
    torch.nn's classes only."""
    torch.manual_seed(0)
    model = nn.Sequential(fusedrnn.LSTM(4, 8))
    quantized = torch.ao.quantization.quantize_dynamic(fusedrnn.to_torch_nn(model), {nn.LSTM})
    assert "quantized" in type(quantized[0]).__module__
    x = torch.randn(5, 2, 4)
    assert rel_err(quantized(x)[0], model(x)[0]) <= 5e-2


def test_hook_handles_attributes_and_weak_references_follow_the_swap():
    """A hook handle taken before the swap still removes the hook; attributes set on the module
    after it was built (a tag, a qconfig) move to the twin; the swapped-out module, still held,
    keeps no weak reference to the parameters (.to() under
    torch.__future__.set_swap_module_params_on_conversion refuses such a tensor)."""
    old = nn.LSTM(3, 4)
    calls = []
    handle = old.register_forward_hook(lambda m, args, out: calls.append(1))
    old.tag = "encoder"
    model = fusedrnn.from_torch_nn(nn.Sequential(old))
    assert model[0].tag == "encoder" and not hasattr(fusedrnn.LSTM(3, 4), "tag")
    handle.remove()
    model(torch.randn(2, 1, 3))
    assert calls == []
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert model[0].weight_ih_l0.dtype == torch.float64
    # The swapped-out module still runs, on the parameters it shares with its twin (it raised
    # "zip() argument 2 is longer than argument 1"; review, session 31).
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for a, b in zip(old(x), model[0](x)):
        torch.testing.assert_close(a, b)
