"""What only a real GPU can show (bench/gpu_check.sh runs these; without a GPU they skip):
CUDA-graph capture and replay, torch.compile, torch.jit.trace and torch.jit.script on CUDA, the
kernels running on the caller's current stream, and the real device's launch plans (tensor
cores, weights streamed from L2) against cuDNN and float64.

The emulator already checks the kernels' arithmetic on every shape class; these tests check the
integration that the emulator cannot: stream and graph semantics, the occupancy-driven plan of a
real device, and tensor-core rounding."""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import fusedrnn

from _helpers import UNIT_ROUNDOFF

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("fusedrnn._cuda") is None,
    reason="needs a CUDA GPU and fusedrnn._cuda")]

CUDA = torch.device("cuda")


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double().cpu()
    diff = (actual.double().cpu() - expected).abs().max().item()
    return diff / max(expected.abs().max().item(), 1e-30)


def _capture(fn, *static_inputs, after_warmup=None):
    """Warms fn up on a side stream (as torch.cuda.graph requires) and captures one call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(side)
    if after_warmup is not None:
        after_warmup()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn(*static_inputs)
    return graph, result


@pytest.mark.parametrize("cls,dtype", [(fusedrnn.LSTM, torch.float32),
                                       (fusedrnn.LSTM, torch.bfloat16),
                                       (fusedrnn.GRU, torch.float16),
                                       (fusedrnn.RNN, torch.float32)])
def test_cuda_graph_inference_replays_new_inputs(cls, dtype):
    torch.manual_seed(0)
    module = cls(24, 40, num_layers=2, bidirectional=True).to(CUDA, dtype)
    static_x = torch.randn(17, 5, 24, device=CUDA, dtype=dtype)
    with torch.no_grad():
        graph, (static_out, static_h) = _capture(lambda x: module(x), static_x)
        for _ in range(2):  # each replay reads the current contents of the static input
            fresh = torch.randn_like(static_x)
            static_x.copy_(fresh)
            graph.replay()
            out, h = module(fresh)
            torch.testing.assert_close(static_out, out)
            torch.testing.assert_close(static_h, h)


@pytest.mark.parametrize("cls", [fusedrnn.LSTM, fusedrnn.GRU])
def test_cuda_graph_replays_new_lengths(cls):
    """A captured call with lengths= (the values checked by a device-side assert while
    capturing, no sync) reads the lengths' current values at each replay, as the input's."""
    torch.manual_seed(0)
    module = cls(24, 40, num_layers=2, bidirectional=True, batch_first=True).to(CUDA)
    static_x = torch.randn(5, 17, 24, device=CUDA)
    static_lengths = torch.tensor([17, 3, 9, 1, 16], device=CUDA)
    with torch.no_grad():
        graph, (static_out, static_h) = _capture(
            lambda x, lengths: module(x, lengths=lengths), static_x, static_lengths)
        for lengths in ([1, 17, 2, 8, 17], [5, 5, 5, 5, 5]):
            fresh = torch.randn_like(static_x)
            static_x.copy_(fresh)
            static_lengths.copy_(torch.tensor(lengths))
            graph.replay()
            out, h = module(fresh, lengths=torch.tensor(lengths))
            torch.testing.assert_close(static_out, out)
            torch.testing.assert_close(static_h if cls is fusedrnn.GRU else static_h[0],
                                       h if cls is fusedrnn.GRU else h[0])


def test_cuda_graph_training_step_matches_eager():
    torch.manual_seed(1)
    module = fusedrnn.LSTM(16, 32, num_layers=2, proj_size=24).to(CUDA)
    eager = copy.deepcopy(module)
    static_x = torch.randn(12, 3, 16, device=CUDA, requires_grad=True)

    def step(x):
        out, (h, c) = module(x)
        (out.square().sum() + h.sum() + c.sum()).backward()

    def forget_warmup_grads():  # the captured backward then writes fresh .grad tensors
        module.zero_grad(set_to_none=True)
        static_x.grad = None

    graph, _ = _capture(step, static_x, after_warmup=forget_warmup_grads)
    fresh = torch.randn_like(static_x)
    with torch.no_grad():
        static_x.copy_(fresh)
    graph.replay()

    x = fresh.clone().requires_grad_()
    out, (h, c) = eager(x)
    (out.square().sum() + h.sum() + c.sum()).backward()
    torch.testing.assert_close(static_x.grad, x.grad)
    for (name, p), q in zip(module.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")


def test_compile_fullgraph_on_cuda_matches_eager():
    torch.manual_seed(2)
    module = fusedrnn.GRU(16, 32, bidirectional=True, batch_first=True).to(CUDA)
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(4, 9, 16, device=CUDA, requires_grad=True)
    out_c, h_c = compiled(x)
    (out_c.sum() + h_c.square().sum()).backward()
    grads_c = [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
    x.grad = None
    module.zero_grad(set_to_none=True)
    out_e, h_e = module(x)
    (out_e.sum() + h_e.square().sum()).backward()
    grads_e = [x.grad] + [p.grad for p in module.parameters()]
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(h_c, h_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_compile_reduce_overhead_inference_on_cuda(kind):
    """torch.compile(mode="reduce-overhead") records the graph's CUDA work in CUDA graphs (cudagraph
    trees): a no-grad call is one fusedrnn::rnn_inference (the inference plan), replayed with new
    inputs and matching the eager module, also after an in-place weight update."""
    torch.manual_seed(6)
    module = getattr(fusedrnn, kind)(16, 32, num_layers=2).to(CUDA)
    compiled = torch.compile(module, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for step in range(4):
            x = torch.randn(7, 3, 16, device=CUDA)
            got = compiled(x)[0].clone()  # a replay's outputs are overwritten by the next one
            torch.testing.assert_close(got, module(x)[0])
            if step == 1:
                for p in module.parameters():
                    p.mul_(0.5)
    torch._dynamo.reset()


def test_trace_on_cuda_matches_eager():
    """torch.jit.trace records the CUDA recurrence as the custom op (tests/test_trace.py checks
    the CPU): a trace made under no_grad, run on other shapes, and one made with gradients, run
    through backward."""
    torch.manual_seed(5)
    module = fusedrnn.LSTM(16, 32, num_layers=2, bidirectional=True).to(CUDA)
    with torch.no_grad():
        traced = torch.jit.trace(module, (torch.randn(6, 3, 16, device=CUDA),))
        x = torch.randn(11, 5, 16, device=CUDA)
        for a, b in zip((traced(x)[0], *traced(x)[1]), (module(x)[0], *module(x)[1])):
            torch.testing.assert_close(a, b)
    traced = torch.jit.trace(module, (torch.randn(6, 3, 16, device=CUDA),))
    x = torch.randn(9, 4, 16, device=CUDA, requires_grad=True)
    grads = []
    for run in (traced, module):
        module.zero_grad(set_to_none=True)
        x.grad = None
        run(x)[0].square().sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in module.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


class _ScriptedLstm(torch.nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor):
        out, (h, c) = self.rnn(x)
        return out, h, c


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_script_on_cuda_matches_eager():
    """torch.jit.script runs the CUDA recurrence as the custom op (tests/test_script.py checks
    the CPU), forward and backward."""
    torch.manual_seed(6)
    module = fusedrnn.LSTM(16, 32, num_layers=2, bidirectional=True).to(CUDA)
    scripted = torch.jit.script(_ScriptedLstm(module))
    x = torch.randn(9, 4, 16, device=CUDA, requires_grad=True)
    grads = []
    for run in (scripted, _ScriptedLstm(module)):
        module.zero_grad(set_to_none=True)
        x.grad = None
        results = run(x)
        sum(r.square().sum() for r in results).backward()
        grads.append([*results, x.grad.clone()] + [p.grad.clone() for p in module.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_kernels_run_on_the_current_stream():
    """The input becomes valid on a side stream only after a long sleep: a kernel launched on any
    other stream would read the NaNs that were there before."""
    torch.manual_seed(3)
    module = fusedrnn.LSTM(8, 16).to(CUDA)
    x = torch.randn(30, 2, 8, device=CUDA)
    with torch.no_grad():
        expected, _ = module(x)
        y = torch.full_like(x, float("nan"))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time
            y.copy_(x)
            out, _ = module(y)
        torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out, expected)


def _against_float64(cls, dtype, T, B, H, **kw):
    """(fusedrnn error, cuDNN error) against torch.nn in float64 on the CPU, on the same
    dtype-rounded weights and inputs: output, final state and the input gradient."""
    torch.manual_seed(4)
    ref = getattr(torch.nn, cls.__name__)(H, H, **kw).to(dtype)
    ours = cls(H, H, **kw).to(dtype)
    ours.load_state_dict(ref.state_dict())
    truth = copy.deepcopy(ref).double()
    x = torch.randn(T, B, H, dtype=dtype)
    d_out = torch.randn(T, B, H * (2 if kw.get("bidirectional") else 1), dtype=dtype)

    def run(module, device, prec):
        inp = x.to(device, prec).clone().requires_grad_()
        out = module.to(device)(inp)[0]
        (out.double() * d_out.to(device).double()).sum().backward()
        return out.detach(), inp.grad

    true_out, true_dx = run(truth, "cpu", torch.float64)
    mine = run(ours, CUDA, dtype)
    try:
        cudnn = run(ref, CUDA, dtype)
    except RuntimeError as exc:  # a cuDNN/torch build without this dtype's RNN
        pytest.skip(f"torch.nn has no {dtype} {cls.__name__} on this GPU: {exc}")
    return ([_rel_err(m, t) for m, t in zip(mine, (true_out, true_dx))],
            [_rel_err(c, t) for c, t in zip(cudnn, (true_out, true_dx))])


def _assert_within_cudnn(cls, dtype, roundoffs, **shape):
    """fusedrnn's error against float64 is at most 2x cuDNN's plus `roundoffs` unit roundoffs."""
    mine, cudnn = _against_float64(cls, dtype, **shape)
    u = UNIT_ROUNDOFF[dtype]
    for what, m, c in zip(("out", "d_input"), mine, cudnn):
        assert m <= 2 * c + roundoffs * u, f"{what}: fusedrnn {m:.3g} vs cuDNN {c:.3g} (u={u:g})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tensor_core_plan_against_cudnn(dtype):
    """B=16 H=768: the anchor's shape class, weights on chip, the product on tensor cores."""
    _assert_within_cudnn(fusedrnn.LSTM, dtype, 2, T=32, B=16, H=768)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_weights_plan_against_cudnn(dtype):
    """H=2048 does not fit on chip in one slice per SM: W_hh streams from L2 every step."""
    _assert_within_cudnn(fusedrnn.LSTM, dtype, 8, T=6, B=4, H=2048)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [fusedrnn.LSTM, fusedrnn.GRU])
def test_staged_streaming_against_cudnn(cls, dtype):
    """Weights forced to stream at H=256: the forward passes row slices through shared memory,
    the backward K ranges of its W_hh columns (K-staged), both on tensor cores; B=20 gives two
    batch tiles, the last one clamped."""
    from fusedrnn import _cuda
    _cuda._set_launch_options(force_streaming=True)
    try:
        _assert_within_cudnn(cls, dtype, 8, T=6, B=20, H=256)
    finally:
        _cuda._set_launch_options()


@pytest.mark.parametrize("cls", [fusedrnn.LSTM, fusedrnn.GRU])
def test_forced_streaming_matches_on_chip(cls):
    """The same layer with the weights kept on chip and streamed: the same answer up to the
    order of the sums (fp32 here, so the difference is rounding)."""
    from fusedrnn import _cuda
    torch.manual_seed(5)
    module = cls(64, 96, bidirectional=True).to(CUDA)
    x = torch.randn(20, 7, 64, device=CUDA)
    with torch.no_grad():
        on_chip, _ = module(x)
        try:
            _cuda._set_launch_options(force_streaming=True)
            streamed, _ = module(x)
        finally:
            _cuda._set_launch_options()
    assert _rel_err(streamed, on_chip) < 1e-5


@pytest.mark.parametrize("max_batch_chunk", [0, 4], ids=["one-chunk", "chunks-of-4"])
@pytest.mark.parametrize("option", ["tagged_exchange", "inputs_ahead"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [fusedrnn.LSTM, fusedrnn.GRU, fusedrnn.RNN])
def test_opt_in_launch_options_change_no_bit(cls, dtype, option, max_batch_chunk):
    """The opt-in launch options move the same values by other means: the tagged exchange sends h
    as tagged words instead of through the grid barrier's buffer, inputs_ahead loads each step's
    inputs a step earlier (B=9 x 12 units per block: every item owned). Outputs and gradients equal
    bit for bit, on a grid of many blocks, both directions, packed lengths, with the weights on
    chip and streamed; and with the batch in chunks of 4 rows (3 chunks, the last one short),
    where each chunk polls its own rows' tagged words (the emulator's chunks are tiny)."""
    from torch.nn.utils.rnn import pack_padded_sequence
    from fusedrnn import _cuda
    torch.manual_seed(6)
    module = cls(64, 768, bidirectional=True).to(CUDA, dtype)
    x = torch.randn(40, 9, 64, device=CUDA, dtype=dtype)
    lengths = torch.tensor([40, 31, 40, 7, 1, 22, 40, 13, 39])
    for force_streaming in (False, True):
        results = []
        for enabled in (False, True):
            _cuda._set_launch_options(force_streaming=force_streaming,
                                      max_batch_chunk=max_batch_chunk, **{option: enabled})
            try:
                leaf = x.clone().requires_grad_()
                module.zero_grad(set_to_none=True)
                out, _ = module(pack_padded_sequence(leaf, lengths, enforce_sorted=False))
                out.data.float().square().sum().backward()
                results.append([out.data, leaf.grad] + [p.grad for p in module.parameters()])
            finally:
                _cuda._set_launch_options()
        for default, opted in zip(*results):
            assert torch.equal(default, opted)


@pytest.mark.parametrize("cls", [fusedrnn.LSTM, fusedrnn.GRU])
def test_one_block_per_direction_matches_many(cls):
    """With one block per direction the kernels meet at the block's barrier, not the grid's: the
    block reads back through global memory (cp.async, past L1) what its own threads wrote. Same
    answer as many blocks up to the order of the sums (fp32), projection and lengths included."""
    from torch.nn.utils.rnn import pack_padded_sequence
    from fusedrnn import _cuda
    torch.manual_seed(7)
    extra = dict(proj_size=24) if cls is fusedrnn.LSTM else {}
    module = cls(32, 48, bidirectional=True, **extra).to(CUDA)
    x = torch.randn(30, 5, 32, device=CUDA)
    lengths = torch.tensor([30, 12, 29, 1, 17])
    results = []
    for cap in (0, 1):
        _cuda._set_launch_options(max_blocks_per_direction=cap)
        try:
            leaf = x.clone().requires_grad_()
            module.zero_grad(set_to_none=True)
            out, _ = module(pack_padded_sequence(leaf, lengths, enforce_sorted=False))
            out.data.square().sum().backward()
            results.append([out.data, leaf.grad] + [p.grad for p in module.parameters()])
        finally:
            _cuda._set_launch_options()
    for many, one in zip(*results):
        assert _rel_err(one, many) < 1e-5


@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_autocast_matches_cudnn_dtype_and_accuracy(name):
    """Under CUDA autocast torch.nn runs cuDNN in float16; fusedrnn runs its kernels in the
    autocast dtype too (the tensor-core product), within 2x cuDNN's error against float32."""
    torch.manual_seed(6)
    ours = getattr(fusedrnn, name)(64, 128, num_layers=2).to(CUDA)
    theirs = getattr(torch.nn, name)(64, 128, num_layers=2).to(CUDA)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(40, 16, 64, device=CUDA)
    with torch.no_grad():
        truth = theirs(x)[0]
        with torch.autocast("cuda"):
            mine, ref = ours(x)[0], theirs(x)[0]
    assert mine.dtype == ref.dtype
    u = UNIT_ROUNDOFF[mine.dtype]
    assert _rel_err(mine, truth) <= 2 * _rel_err(ref, truth) + 2 * u
