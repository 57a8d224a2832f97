"""A small CUDA forward + backward of every fusedrnn cell, for compute-sanitizer.

bench/gpu_check.sh runs it under memcheck, racecheck and synccheck. Shapes are tiny and odd (no
multiple of any tile) and cover the kernel variants: every cell, fp32/fp64/fp16/bf16, two layers,
bidirectional, proj_size, packed variable lengths, and an H large enough that W_hh cannot stay on
chip (the streaming variant; in bf16 its forward stages the weights through shared memory). Each
result is also compared with torch.nn in float64 on the CPU, so a wrong answer fails the run even
where the sanitizer sees nothing.

Every case runs twice: as planned by default, and with the opt-in launch options (the forward's
tagged exchange, tagged_exchange.cuh, which float64 has not; the inputs loaded a step ahead). Every case seeds its weights and inputs, so the three sanitizer runs compute the same thing: an
error that moves between them points at a race. In float16 and bfloat16 an error is judged
against torch.nn's own (cuDNN's) error in the same dtype, as DESIGN.md asks: at these tiny sizes
one pre-activation rounded across zero flips a relu derivative, and a gradient's error jumps to
1e-2 for cuDNN as for us (seen on an H200, 2026-11-27: rnn-relu-L2-fp16 at 2.85e-2 in one run).

    python bench/sanitizer_smoke.py            # exit 0: every case ran and matched
"""
from __future__ import annotations

import sys

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fusedrnn

CLASSES = {"lstm": ("LSTM", {}), "gru": ("GRU", {}), "rnn_tanh": ("RNN", {"nonlinearity": "tanh"}),
           "rnn_relu": ("RNN", {"nonlinearity": "relu"})}
# name, cell, dtype, T, B, I, H, extra constructor arguments, packed
CASES = [
    ("lstm-fp32", "lstm", torch.float32, 5, 3, 11, 37, {}, False),
    ("lstm-L2-bi-bf16", "lstm", torch.bfloat16, 4, 3, 11, 37, {"num_layers": 2, "bidirectional": True}, False),
    ("lstm-proj-fp16", "lstm", torch.float16, 4, 3, 11, 37, {"proj_size": 13}, False),
    ("lstm-packed-bi-fp32", "lstm", torch.float32, 6, 4, 11, 37, {"bidirectional": True}, True),
    ("lstm-fp64", "lstm", torch.float64, 3, 2, 5, 19, {}, False),
    ("lstm-streaming-fp32", "lstm", torch.float32, 3, 2, 16, 1536, {}, False),
    ("lstm-staged-bf16", "lstm", torch.bfloat16, 3, 2, 16, 2048, {}, False),
    ("gru-bi-fp32", "gru", torch.float32, 5, 3, 11, 37, {"bidirectional": True}, False),
    ("gru-packed-bf16", "gru", torch.bfloat16, 5, 4, 11, 37, {}, True),
    ("rnn-tanh-fp32", "rnn_tanh", torch.float32, 5, 3, 11, 37, {}, False),
    ("rnn-relu-L2-fp16", "rnn_relu", torch.float16, 5, 3, 11, 37, {"num_layers": 2}, False),
]
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def flatten(out, state):
    return [out.data if isinstance(out, PackedSequence) else out] + (list(state) if isinstance(state, tuple) else [state])


def run_case(library, seed, name, cell, dtype, T, B, I, H, extra, packed) -> float:
    """Max relative error of library's module (fusedrnn or torch.nn) on CUDA against float64."""
    cls_name, cell_kw = CLASSES[cell]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    ref = getattr(torch.nn, cls_name)(I, H, **cell_kw, **extra).double()
    module = getattr(library, cls_name)(I, H, **cell_kw, **extra).to("cuda", dtype)
    module.load_state_dict(ref.state_dict())
    ref.load_state_dict({k: v.to(dtype).double() for k, v in ref.state_dict().items()})  # same rounding

    x = torch.randn(T, B, I, generator=g, dtype=torch.float64).to(dtype).double()
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T

    def inputs(device, dt):
        xs = x.to(device, dt).requires_grad_()
        return xs, (pack_padded_sequence(xs, lengths, enforce_sorted=False) if packed else xs)

    x_gpu, inp_gpu = inputs("cuda", dtype)
    x_cpu, inp_cpu = inputs("cpu", torch.float64)
    out_gpu, state_gpu = module(inp_gpu)
    out_cpu, state_cpu = ref(inp_cpu)
    outs_gpu, outs_cpu = flatten(out_gpu, state_gpu), flatten(out_cpu, state_cpu)
    grads = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype).double() for o in outs_cpu]
    torch.autograd.backward(outs_gpu, [gr.to("cuda", dtype) for gr in grads])
    torch.autograd.backward(outs_cpu, grads)
    torch.cuda.synchronize()
    pairs = list(zip(outs_gpu, outs_cpu)) + [(x_gpu.grad, x_cpu.grad)]
    ref_params = dict(ref.named_parameters())
    pairs += [(p.grad, ref_params[n].grad) for n, p in module.named_parameters()]
    for got, want in pairs:
        if got is None or not torch.isfinite(got).all():
            return float("inf")
    return max(rel_err(got, want) for got, want in pairs)


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitizer_smoke: no CUDA GPU visible to torch", file=sys.stderr)
        return 2
    failed = 0
    from fusedrnn import _cuda
    # The cases again (same seeds) with the opt-in launch options: the forward's tagged exchange
    # instead of its grid barrier (not in float64) and the inputs loaded a step ahead.
    runs = [(seed, case, opted) for opted in (False, True) for seed, case in enumerate(CASES)]
    for seed, case, opted in runs:
        tagged = opted and case[2] != torch.float64
        _cuda._set_launch_options(tagged_exchange=tagged, inputs_ahead=opted)
        suffix = ("-tagged" if tagged else "") + ("-ahead" if opted else "")
        case = (case[0] + suffix,) + tuple(case[1:])
        name, dtype = case[0], case[2]
        try:
            err = run_case(fusedrnn, seed, *case)
            bar, why = TOLERANCE[dtype], f"tolerance {TOLERANCE[dtype]:.0e}"
            if dtype in UNIT_ROUNDOFF:
                torch_err = run_case(torch.nn, seed, *case)
                bar = max(bar, 2 * torch_err + 2 * UNIT_ROUNDOFF[dtype])
                why += f"; torch.nn's {torch_err:.2e}"
        except Exception as exc:
            print(f"FAIL  {name}: {type(exc).__name__}: {exc}")
            failed += 1
            continue
        ok = err <= bar
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'}  {name}: max rel err {err:.2e} ({why})")
    _cuda._set_launch_options()
    print(f"sanitizer_smoke: {len(runs) - failed} of {len(runs)} cases ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
