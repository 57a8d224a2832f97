"""Where a step of the persistent CUDA recurrence goes: numbers for the next kernel change.

A lent GPU comes rarely and for minutes, so this gathers in one run what the bench table cannot
say (bench/gpu_check.sh says how fast; this says why):

- per step: the time of a forward (or forward + backward) at two sequence lengths, whose
  difference over the step count is the cost of one step without the launch and the projections;
  swept over H, B, the blocks per direction and the weight placement, for fusedrnn and for
  torch.nn (cuDNN) on the same shapes;
- the forward's state exchange, grid barrier per step against tagged words (opt-in,
  csrc/cuda/tagged_exchange.cuh), each with and without the inputs loaded a step ahead (opt-in,
  ItemThreads in csrc/cuda/recurrence_common.cuh), on the same shapes in the same process;
- the floor of a step's communication (cupy, when importable): a cooperative grid of 256-thread
  blocks that only exchanges the state through L2 and meets at a grid barrier, with
  cooperative_groups' grid.sync() and with a counter barrier of release/acquire atomics.

    python bench/gpu_probe.py [sections...]     # sections: exchange steps barrier (default: all)
    ncu --clock-control none -k regex:recurrence_ --launch-skip 1 --launch-count 3 \
        --section WarpStateStats --section SourceCounters -o anchor python bench/gpu_probe.py anchor

The section anchor runs LSTM B=16 T=1024 H=768 bf16 twice in inference and once in training
(forward kernel, forward kernel, backward kernel), for a profiler to catch the last three.

Prints one line per measurement; nothing is asserted.
"""
from __future__ import annotations

import statistics
import sys

import torch

import fusedrnn
from fusedrnn import _backend
from fusedrnn.bench.timing import CudaClock

CUDA = torch.device("cuda")
T_SHORT, T_LONG = 256, 1024


def median_ms(fn, reps: int = 7, warmup: int = 2) -> float:
    """Median of `reps` calls timed with CUDA events (the benchmark's clock), after `warmup`."""
    for _ in range(warmup):
        fn()
    clock = CudaClock(CUDA)
    return statistics.median(clock.time_ms(fn) for _ in range(reps))


def modules(cell: str, H: int, dtype, I: int = 256, **kw):
    torch.manual_seed(0)
    theirs = getattr(torch.nn, cell)(I, H, **kw).to(CUDA, dtype)
    ours = getattr(fusedrnn, cell)(I, H, **kw).to(CUDA, dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def per_step_us(module, B: int, dtype, train: bool, I: int = 256, steps=(T_SHORT, T_LONG)):
    """(ms at the short T, ms at the long T, us per step from their difference)."""
    times = []
    for T in steps:
        x = torch.randn(T, B, I, device=CUDA, dtype=dtype, requires_grad=train)
        if train:
            dy = torch.randn(T, B, module.hidden_size * (2 if module.bidirectional else 1),
                             device=CUDA, dtype=dtype)

            def call():
                module(x)[0].backward(dy)
        else:
            def call():
                with torch.no_grad():
                    module(x)
        times.append(median_ms(call))
    return times[0], times[1], (times[1] - times[0]) * 1e3 / (steps[1] - steps[0])


def report(label: str, module, B: int, dtype, train: bool, **kw) -> None:
    t_short, t_long = kw.get("steps", (T_SHORT, T_LONG))
    try:
        short, long, us = per_step_us(module, B, dtype, train, **kw)
        print(f"{label:58s} T{t_short} {short:8.3f} ms  T{t_long} {long:8.3f} ms  "
              f"{us:7.2f} us/step", flush=True)
    except Exception as exc:  # a probe reports and goes on
        print(f"{label:58s} failed: {type(exc).__name__}: {exc}", flush=True)


def launch_options(**kw) -> None:
    _backend._cuda._set_launch_options(**kw)


def steps_section() -> None:
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    print("== per-step cost, LSTM B=16 inference, over H (fusedrnn bf16 / cuDNN fp16)")
    for H in (32, 128, 256, 512, 768, 1024):
        ours, theirs = modules("LSTM", H, bf16)
        report(f"fusedrnn bf16 LSTM B16 H{H} inf", ours, 16, bf16, False)
        ours16, theirs16 = modules("LSTM", H, fp16)
        report(f"fusedrnn fp16 LSTM B16 H{H} inf", ours16, 16, fp16, False)
        report(f"cudnn    fp16 LSTM B16 H{H} inf", theirs16, 16, fp16, False)
    ours, theirs = modules("LSTM", 768, fp32)
    report("fusedrnn fp32 LSTM B16 H768 inf", ours, 16, fp32, False)
    report("cudnn    fp32 LSTM B16 H768 inf (tf32 default)", theirs, 16, fp32, False)

    print("== LSTM B=16 H=768 bf16 inference, blocks per direction capped (132 SMs)")
    ours, _ = modules("LSTM", 768, bf16)
    for cap in (96, 64, 48, 32, 24, 16, 8):
        launch_options(max_blocks_per_direction=cap)
        report(f"fusedrnn bf16 H768 blocks<={cap}", ours, 16, bf16, False)
    launch_options()
    launch_options(force_streaming=True)
    report("fusedrnn bf16 H768 weights streamed (FMA)", ours, 16, bf16, False)
    launch_options()

    print("== small H, one block per direction (its own barrier) against the default plan")
    for H in (64, 128):
        ours, _ = modules("LSTM", H, bf16)
        for cap in (0, 4, 1):
            launch_options(max_blocks_per_direction=cap)
            report(f"fusedrnn bf16 LSTM B16 H{H} inf blocks<={cap or 'all'}", ours, 16, bf16, False)
        launch_options()

    print("== LSTM H=768 bf16 inference over B")
    ours, _ = modules("LSTM", 768, bf16)  # (the small-H loop above rebound ours to H=128)
    for B in (1, 4, 16, 64, 128):
        report(f"fusedrnn bf16 H768 B{B}", ours, B, bf16, False)

    print("== training (forward + backward), LSTM B=16 H=768")
    for dtype, name in ((bf16, "bf16"), (fp16, "fp16")):
        ours, theirs = modules("LSTM", 768, dtype)
        report(f"fusedrnn {name} H768 train", ours, 16, dtype, True)
        report(f"cudnn    {name} H768 train", theirs, 16, dtype, True)
    ours, _ = modules("LSTM", 768, bf16)
    for cap in (64, 32):
        launch_options(max_blocks_per_direction=cap)
        report(f"fusedrnn bf16 H768 train blocks<={cap}", ours, 16, bf16, True)
    launch_options()

    print("== LSTM B=64 H=1024 bf16, blocks per direction capped: every block reads the whole "
          "B x 4H gate gradient each backward step (132 blocks: 67 MB a step through L2)")
    ours, _ = modules("LSTM", 1024, bf16)
    for cap in (0, 96, 66, 48, 33):
        launch_options(max_blocks_per_direction=cap)
        report(f"fusedrnn bf16 H1024 B64 inf blocks<={cap or 'all'}", ours, 64, bf16, False,
               steps=(64, 256))
        report(f"fusedrnn bf16 H1024 B64 train blocks<={cap or 'all'}", ours, 64, bf16, True,
               steps=(64, 256))
    launch_options()

    print("== LSTM variants, B=16 H=768 bf16: the peephole weights are read from global memory "
          "in every step's cell update (csrc/cuda/cell_traits.cuh); a CIFG runs three gates "
          "(CifgTraits)")
    for name, kw in (("plain", {}), ("peephole", dict(peephole=True)),
                     ("cifg", dict(coupled_input_forget=True))):
        torch.manual_seed(0)
        variant = fusedrnn.LSTM(256, 768, **kw).to(CUDA, bf16)
        report(f"fusedrnn bf16 LSTM {name} B16 H768 inf", variant, 16, bf16, False)
        report(f"fusedrnn bf16 LSTM {name} B16 H768 train", variant, 16, bf16, True)

    print("== GRU and a large H (weights streamed)")
    ours, theirs = modules("GRU", 768, bf16)
    report("fusedrnn bf16 GRU B16 H768 inf", ours, 16, bf16, False)
    for H in (1536, 2048):
        ours, theirs = modules("LSTM", H, bf16)
        report(f"fusedrnn bf16 LSTM B16 H{H} inf", ours, 16, bf16, False, steps=(32, 128))
        report(f"cudnn    bf16 LSTM B16 H{H} inf", theirs, 16, bf16, False, steps=(32, 128))
    # The backward of H=2048 streams W_hh (K-staged on tensor cores).
    ours, theirs = modules("LSTM", 2048, bf16)
    report("fusedrnn bf16 LSTM B16 H2048 train", ours, 16, bf16, True, steps=(32, 128))
    report("cudnn    bf16 LSTM B16 H2048 train", theirs, 16, bf16, True, steps=(32, 128))


# The forward's exchange and when the owned items load their inputs: each (tagged, inputs_ahead)
# pair of launch options (both opt-in until measured).
EXCHANGE_VARIANTS = [(False, False), (False, True), (True, False), (True, True)]


def variant_label(tagged: bool, ahead: bool) -> str:
    return f"{'tagged' if tagged else 'barrier'}{' +ahead' if ahead else ''}"


def exchange_section() -> None:
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    print("== forward exchange: a grid barrier per step against tagged words (opt-in); "
          "+ahead: owned items load the next step's inputs during the exchange (opt-in)")
    shapes = [("LSTM", bf16, 16, H, False) for H in (32, 256, 768, 1024)] + [
        ("LSTM", fp16, 16, 768, False), ("LSTM", fp32, 16, 768, False),
        ("GRU", bf16, 16, 768, False), ("LSTM", bf16, 64, 1024, False),
        ("LSTM", bf16, 16, 768, True), ("GRU", bf16, 16, 768, True)]
    for cell, dtype, B, H, train in shapes:
        ours, _ = modules(cell, H, dtype)
        for tagged, ahead in EXCHANGE_VARIANTS:
            launch_options(tagged_exchange=tagged, inputs_ahead=ahead)
            label = (f"fusedrnn {str(dtype)[6:]} {cell} B{B} H{H} {'train' if train else 'inf'} "
                     f"{variant_label(tagged, ahead)}")
            report(label, ours, B, dtype, train)
        launch_options()
    ours, _ = modules("LSTM", 2048, bf16)  # staged streaming
    for tagged, ahead in EXCHANGE_VARIANTS:
        launch_options(tagged_exchange=tagged, inputs_ahead=ahead)
        label = f"fusedrnn bfloat16 LSTM B16 H2048 inf {variant_label(tagged, ahead)}"
        report(label, ours, 16, bf16, False, steps=(32, 128))
    launch_options()


BARRIER_SOURCE = r"""
#include <cooperative_groups.h>
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void red_release(unsigned* p, unsigned v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void grid_meet(unsigned* counter, unsigned target, int use_cg) {
  if (use_cg) { cooperative_groups::this_grid().sync(); return; }
  __syncthreads();
  if (threadIdx.x == 0) {
    red_release(counter, 1u);
    while (ld_acquire(counter) < target) {}
  }
  __syncthreads();
}
// Per step: read the whole state (vecs 16-byte vectors) into shared memory, write this block's
// slice of the next state, meet at the barrier. vecs = 0: the barrier alone.
extern "C" __global__ void step_floor(unsigned* counter, uint4* state, int steps, int vecs,
                                      int use_cg) {
  extern __shared__ uint4 smem[];
  const int per = (vecs + gridDim.x - 1) / gridDim.x;
  for (int s = 0; s < steps; ++s) {
    const uint4* src = state + (s & 1) * vecs;
    uint4* dst = state + ((s + 1) & 1) * vecs;
    for (int i = threadIdx.x; i < vecs; i += blockDim.x) smem[i] = src[i];
    __syncthreads();
    for (int i = threadIdx.x; i < per; i += blockDim.x) {
      const int j = blockIdx.x * per + i;
      if (j < vecs) dst[j] = smem[(j + 1) % vecs];
    }
    grid_meet(counter, (unsigned)(s + 1) * gridDim.x, use_cg);
  }
}
"""


def barrier_section() -> None:
    try:
        import cupy
    except ImportError:
        print("== barrier floor: cupy not importable, skipped")
        return
    print("== step floor: state exchange through L2 + grid barrier, 256 threads per block")
    kernel = cupy.RawKernel(BARRIER_SOURCE, "step_floor", options=("-std=c++17",),
                            enable_cooperative_groups=True)
    steps = 2000
    for blocks in (132, 66, 32, 16):
        for B, H in ((0, 0), (16, 768), (64, 1024)):
            vecs = B * H * 2 // 16
            kernel.max_dynamic_shared_size_bytes = max(vecs * 16, 16)
            for use_cg in (1, 0):
                counter = cupy.zeros(1, dtype=cupy.uint32)
                state = cupy.zeros(max(2 * vecs, 1) * 4, dtype=cupy.uint32)
                args = (counter, state, cupy.int32(steps), cupy.int32(vecs), cupy.int32(use_cg))
                kernel((blocks,), (256,), args, shared_mem=max(vecs * 16, 16))  # warm-up
                cupy.cuda.Device().synchronize()
                start, end = cupy.cuda.Event(), cupy.cuda.Event()
                counter.fill(0)
                start.record()
                kernel((blocks,), (256,), args, shared_mem=max(vecs * 16, 16))
                end.record()
                end.synchronize()
                us = cupy.cuda.get_elapsed_time(start, end) * 1e3 / steps
                what = "barrier only" if vecs == 0 else f"exchange B{B} H{H} bf16"
                print(f"{blocks:4d} blocks  {what:26s} {'grid.sync' if use_cg else 'atomics  '}"
                      f"  {us:6.2f} us/step", flush=True)


def anchor_section() -> None:
    ours, _ = modules("LSTM", 768, torch.bfloat16, I=768)
    x = torch.randn(1024, 16, 768, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        ours(x)
        ours(x)
    ours(x)[0].sum().backward()
    torch.cuda.synchronize()
    print("anchor: LSTM B16 T1024 H768 bf16, two inference calls and one training step ran")


def main(argv) -> int:
    if not torch.cuda.is_available() or not _backend.HAS_CUDA:
        print("gpu_probe: needs a CUDA GPU and fusedrnn._cuda", file=sys.stderr)
        return 2
    sections = argv or ["exchange", "steps", "barrier"]
    print(f"gpu_probe on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in sections:
        {"steps": steps_section, "barrier": barrier_section, "anchor": anchor_section,
         "exchange": exchange_section}[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
