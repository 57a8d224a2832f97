"""torch.export: a model holding fusedrnn modules exports as the layers' custom ops (their fake
kernels give the shapes), with dynamic batch and sequence length, and the exported program, also
after torch.export.save/load, gives the eager model's results on other sizes (float32, within
rounding)."""
import io

import pytest
import torch

import fusedrnn

from _helpers import requires_native

pytestmark = requires_native


class _Tagger(torch.nn.Module):
    """A bidirectional 2-layer LSTM over the sequence, a GRU cell on its last output."""

    def __init__(self):
        super().__init__()
        self.rnn = fusedrnn.LSTM(4, 8, num_layers=2, bidirectional=True, batch_first=True,
                                 proj_size=3)
        self.cell = fusedrnn.GRUCell(6, 5)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.cell(out[:, -1])


class _Elman(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = fusedrnn.RNN(4, 6, nonlinearity="relu")

    def forward(self, x, h0):
        return self.rnn(x, h0)


class _Variants(torch.nn.Module):
    """A peephole CIFG LSTM, bidirectional, and a peephole LSTM cell on its last output."""

    def __init__(self):
        super().__init__()
        self.rnn = fusedrnn.LSTM(4, 8, bidirectional=True, peephole=True,
                                 coupled_input_forget=True)
        self.cell = fusedrnn.LSTMCell(16, 5, peephole=True)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.cell(out[-1])


# (model class, inputs of batch b and length t, their dynamic dims)
EXPORTED_MODELS = pytest.mark.parametrize("make, args, dims", [
    (_Tagger, lambda b, t: (torch.randn(b, t, 4),), lambda b, t: ({0: b, 1: t},)),
    (_Elman, lambda b, t: (torch.randn(t, b, 4), torch.randn(1, b, 6)),
     lambda b, t: ({0: t, 1: b}, {1: b})),
    (_Variants, lambda b, t: (torch.randn(t, b, 4),), lambda b, t: ({0: t, 1: b},)),
], ids=["lstm-bidir-proj-and-gru-cell", "rnn-relu-with-state", "lstm-variants-and-cell"])


@EXPORTED_MODELS
def test_exported_program_matches_eager(make, args, dims):
    torch.manual_seed(0)
    model = make().eval()
    batch, steps = torch.export.Dim("batch", min=2, max=64), torch.export.Dim("steps", min=2)
    program = torch.export.export(model, args(3, 5), dynamic_shapes=dims(batch, steps))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    for b, t in [(3, 5), (7, 11), (2, 2)]:
        inputs = args(b, t)
        with torch.no_grad():
            expected = model(*inputs)
            for exported in (program, loaded):
                got = exported.module()(*inputs)
                for g, e in zip(torch.utils._pytree.tree_leaves(got),
                                torch.utils._pytree.tree_leaves(expected)):
                    # (The eager cell may take the native cell step, the export its op over
                    # one step: another summation order.)
                    torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=f"B={b} T={t}")


@EXPORTED_MODELS
def test_aot_inductor_package_matches_eager(make, args, dims, tmp_path):
    """The exported program compiled ahead of time by AOTInductor (torch's path to serving an
    exported model), packaged, loaded and run at other sizes: the package calls the layers'
    custom op (through its proxy executor) and gives the eager model's results. Before, every
    call failed: the executor hands an op an empty Tensor[] argument (a layer without a
    projection, bias or peepholes) as None, which the op's schema refused."""
    torch.manual_seed(0)
    model = make().eval()
    batch, steps = torch.export.Dim("batch", min=2, max=64), torch.export.Dim("steps", min=2)
    program = torch.export.export(model, args(3, 5), dynamic_shapes=dims(batch, steps))
    path = torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp_path / "model.pt2"))
    compiled = torch._inductor.aoti_load_package(path)
    for b, t in [(3, 5), (7, 11), (2, 2)]:
        inputs = args(b, t)
        with torch.no_grad():
            expected = model(*inputs)
        got = compiled(*inputs)
        for g, e in zip(torch.utils._pytree.tree_leaves(got),
                        torch.utils._pytree.tree_leaves(expected)):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=f"B={b} T={t}")
