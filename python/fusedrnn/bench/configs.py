"""Benchmark configurations and the presets that group them.

A configuration is one network shape (cell, layers, directions, sizes, dtype, packing) plus the
modes it is timed in. Presets are plain lists in a registry, so adding a shape is one line.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
MODES = ("inference", "training")
# Short names users type -> torch dtype attribute names.
DTYPE_ALIASES = {
    "fp32": "float32", "float32": "float32", "float": "float32",
    "fp64": "float64", "float64": "float64", "double": "float64",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}
DTYPE_SHORT = {"float32": "fp32", "float64": "fp64", "float16": "fp16", "bfloat16": "bf16"}
# The LSTM variants fusedrnn adds (fusedrnn.LSTM's keyword arguments), by config name.
VARIANTS = {
    "peephole": {"peephole": True},
    "cifg": {"coupled_input_forget": True},
    "peephole-cifg": {"peephole": True, "coupled_input_forget": True},
}


def canonical_dtype(name: str) -> str:
    key = name.strip().lower()
    if key not in DTYPE_ALIASES:
        raise ValueError(f"--dtype: unknown dtype {name!r}; expected one of "
                         f"{sorted(set(DTYPE_ALIASES))}")
    return DTYPE_ALIASES[key]


def canonical_cell(name: str) -> str:
    key = name.strip().lower()
    key = {"rnn": "rnn_tanh", "tanh": "rnn_tanh", "relu": "rnn_relu", "elman": "rnn_tanh"}.get(key, key)
    if key not in CELLS:
        raise ValueError(f"--cell: unknown cell {name!r}; expected one of {list(CELLS)} (or 'rnn')")
    return key


@dataclass(frozen=True)
class BenchConfig:
    """One benchmarked network. Sequence-first layout [T, B, I], like torch.nn's default."""
    cell: str                      # lstm | gru | rnn_tanh | rnn_relu
    seq_len: int                   # T (the longest sequence when packed)
    batch: int                     # B
    hidden: int                    # H
    input_size: Optional[int] = None   # I; None means I = H
    layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0             # LSTM only
    packed: bool = False           # variable lengths through a PackedSequence
    # Variable lengths as a padded batch and its lengths, the form a model has them in:
    # fusedrnn's modules take them (lengths=); torch.nn packs, runs and pads again, inside the
    # timed call (impls.PacksAround), as a model built on torch.nn must.
    lengths: bool = False
    dtype: str = "float32"
    modes: Tuple[str, ...] = MODES
    cuda_only: bool = False        # shapes that only make sense on a GPU (the anchor in fp16)
    # Feed the sequence one step per call, carrying the state, as a streaming server or a decoder
    # loop does: T calls of T=1 per timed run, the same Python loop around every implementation.
    step_calls: bool = False
    # Issue 4's CPU goal for this shape, as torch.nn median / fusedrnn median; reported, never asserted.
    target_speedup: Optional[float] = field(default=None, compare=False)
    # An LSTM variant torch.nn does not have (VARIANTS), or "" for the plain cell. Its rows are
    # checked against the float64 reference, and "vs torch" compares with torch.nn's plain LSTM
    # of the same shape: what the variant costs against what users run today.
    variant: str = ""
    # The RNN inside a small model: Linear(I, I) and tanh before it, Linear(D*P, D*P) on its
    # output (impls.ModelAround), as torch.compile meets it in real use: torch.nn's RNN splits
    # such a graph in two (Dynamo leaves it to eager code), fusedrnn's does not.
    in_model: bool = False

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.proj_size and self.cell != "lstm":
            raise ValueError(f"proj_size is LSTM only, got cell={self.cell!r} proj_size={self.proj_size}")
        if self.variant and (self.variant not in VARIANTS or self.cell != "lstm"):
            raise ValueError(f"variant must be one of {sorted(VARIANTS)} for an LSTM, got "
                             f"cell={self.cell!r} variant={self.variant!r}")
        if self.packed and self.lengths:
            raise ValueError("packed and lengths are two forms of variable lengths: choose one")
        if self.step_calls and (self.packed or self.lengths or self.bidirectional):
            # A reverse direction fed one step per call sees one step, not the sequence.
            raise ValueError("step_calls feeds one forward step per call: it cannot be combined "
                             "with packed, lengths or bidirectional")
        if self.in_model and (self.packed or self.lengths or self.step_calls or self.variant):
            raise ValueError("in_model wraps a plain RNN fed whole padded sequences: it cannot be "
                             "combined with packed, lengths, step_calls or a variant")
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for name in ("seq_len", "batch", "hidden", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def in_size(self) -> int:
        return self.input_size if self.input_size is not None else self.hidden

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def state_size(self) -> int:
        """P: the size of h (proj_size when the LSTM projects)."""
        return self.proj_size or self.hidden

    @property
    def name(self) -> str:
        """A readable id, e.g. lstm-L2-bi-B32-T100-I256-H256-fp32."""
        parts = [self.cell.replace("_", "-")]
        if self.variant:
            parts.append(self.variant)
        if self.layers > 1:
            parts.append(f"L{self.layers}")
        if self.bidirectional:
            parts.append("bi")
        parts += [f"B{self.batch}", f"T{self.seq_len}"]
        if self.input_size is not None and self.input_size != self.hidden:
            parts.append(f"I{self.input_size}")
        parts.append(f"H{self.hidden}")
        if self.proj_size:
            parts.append(f"P{self.proj_size}")
        if self.packed:
            parts.append("packed")
        if self.lengths:
            parts.append("lengths")
        if self.step_calls:
            parts.append("steps")
        if self.in_model:
            parts.append("model")
        parts.append(DTYPE_SHORT[self.dtype])
        return "-".join(parts)

    def module_kwargs(self) -> dict:
        """The constructor arguments shared by torch.nn and fusedrnn modules."""
        kw = dict(input_size=self.in_size, hidden_size=self.hidden, num_layers=self.layers,
                  bidirectional=self.bidirectional)
        if self.proj_size:
            kw["proj_size"] = self.proj_size
        if self.cell.startswith("rnn_"):
            kw["nonlinearity"] = self.cell[len("rnn_"):]
        return kw

    def variant_kwargs(self) -> dict:
        """The fusedrnn.LSTM keyword arguments of the variant ({} for the plain cell)."""
        return dict(VARIANTS[self.variant]) if self.variant else {}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["input_size"] = self.in_size
        d["modes"] = list(self.modes)
        d["name"] = self.name
        if d["target_speedup"] is None:
            del d["target_speedup"]
        if not d["variant"]:
            del d["variant"]
        if not d["in_model"]:
            del d["in_model"]
        if not d["lengths"]:
            del d["lengths"]
        return d

    def replace(self, **changes) -> "BenchConfig":
        return dataclasses.replace(self, **changes)


INF = ("inference",)
TRAIN = ("training",)
BOTH = MODES


def _c(cell, T, B, H, modes=BOTH, **kw) -> BenchConfig:
    return BenchConfig(cell=cell, seq_len=T, batch=B, hidden=H, modes=modes, **kw)


# The CPU targets of issue 4, each exactly as the issue states it (ratios against torch.nn).
ISSUE4_TARGETS: List[BenchConfig] = [
    _c("lstm", 100, 1, 64, INF, target_speedup=6.0),
    _c("lstm", 100, 1, 128, INF, target_speedup=4.0),
    _c("gru", 100, 1, 128, TRAIN, target_speedup=5.0),
    _c("gru", 100, 16, 256, TRAIN, target_speedup=2.0),
    _c("lstm", 100, 32, 256, TRAIN, layers=2, bidirectional=True, target_speedup=1.4),
    _c("lstm", 50, 64, 512, TRAIN, input_size=512, target_speedup=0.95),
]
# Issue 4 also asks that no standard configuration run below this ratio.
STANDARD_FLOOR = 0.95

QUICK: List[BenchConfig] = ISSUE4_TARGETS[:3] + [
    _c("lstm", 50, 8, 128, TRAIN),
    _c("lstm", 50, 1, 256, INF, step_calls=True),  # streaming: one step per call
]

STANDARD: List[BenchConfig] = ISSUE4_TARGETS + [
    # Small-batch inference: per-step overhead dominates (B=1, T=100..1000, H=64..512).
    _c("lstm", 100, 1, 256, INF),
    _c("lstm", 100, 1, 512, INF),
    _c("lstm", 1000, 1, 64, INF),
    _c("lstm", 1000, 1, 256, INF),
    _c("gru", 100, 1, 256, INF),
    _c("gru", 1000, 1, 128, INF),
    _c("rnn_tanh", 100, 1, 256, INF),
    _c("rnn_relu", 1000, 1, 128, INF),
    _c("lstm", 100, 1, 256, INF, proj_size=128),
    _c("lstm", 100, 1, 128, INF, layers=2, bidirectional=True),
    # Training at B=64 (T=50..200, H=256..1024): GEMM-heavy, torch is near peak here.
    _c("lstm", 50, 64, 256, TRAIN),
    _c("lstm", 200, 64, 256, TRAIN),
    _c("lstm", 50, 64, 1024, TRAIN),
    _c("gru", 100, 64, 512, TRAIN),
    _c("rnn_tanh", 200, 64, 512, TRAIN),
    _c("lstm", 50, 64, 256, TRAIN, layers=2, bidirectional=True),
    # Variable-length batches: packed, and as a padded batch with its lengths (torch.nn packs
    # and pads inside the call).
    _c("lstm", 100, 32, 256, BOTH, packed=True),
    _c("lstm", 100, 32, 256, BOTH, lengths=True),
    _c("gru", 200, 16, 256, INF, packed=True),
]

# A sequence fed one step per call (step_calls): streaming inference, and training through a
# loop of steps (a decoder with teacher forcing). Each call is one step of every layer, so the
# per-call cost is the whole story: fusedrnn runs such a step as torch GEMMs and one native
# pointwise pass per layer and direction (_cell_step.py), with no packing of W_hh.
STREAMING: List[BenchConfig] = [
    _c("lstm", 50, 1, 64, BOTH, step_calls=True),
    _c("lstm", 50, 1, 256, BOTH, step_calls=True),
    _c("lstm", 50, 1, 256, INF, layers=2, step_calls=True),
    _c("lstm", 50, 16, 512, BOTH, step_calls=True),
    _c("gru", 50, 1, 128, BOTH, step_calls=True),
    _c("gru", 50, 16, 512, BOTH, step_calls=True),
    _c("rnn_tanh", 50, 1, 256, BOTH, step_calls=True),
]

# Batched inference (serving many sequences at once), which the standard preset leaves out. On the
# CPU this is where torch.nn is strongest: its LSTM inference is oneDNN's fused kernel, whose
# per-step GEMM runs at MKL's rate from B=32 on.
BATCH: List[BenchConfig] = [
    _c("lstm", 100, 16, 256, INF),
    _c("lstm", 100, 32, 256, INF),
    _c("lstm", 100, 64, 256, INF),
    _c("lstm", 100, 64, 512, INF),
    _c("gru", 100, 64, 256, INF),
    _c("rnn_tanh", 100, 64, 256, INF),
]

# The published comparison point (DESIGN.md): H100, LSTM B=16 T=1024 H=768.
ANCHOR: List[BenchConfig] = [
    _c("lstm", 1024, 16, 768, BOTH, dtype="float16", cuda_only=True),
    _c("lstm", 1024, 16, 768, BOTH, dtype="bfloat16", cuda_only=True),
    _c("lstm", 1024, 16, 768, BOTH, dtype="float32"),
]

# What bench/gpu_check.sh runs: the anchor plus the shapes where cuDNN leaves its fast path.
GPU: List[BenchConfig] = ANCHOR + [
    _c("lstm", 1024, 16, 768, BOTH, dtype="bfloat16", layers=2, bidirectional=True, cuda_only=True),
    _c("lstm", 100, 1, 256, INF),
    _c("lstm", 1000, 1, 1024, INF),
    _c("gru", 1024, 16, 768, BOTH, dtype="bfloat16", cuda_only=True),
    _c("gru", 1024, 16, 768, BOTH),
    _c("rnn_tanh", 1024, 16, 1024, BOTH),
    _c("lstm", 512, 64, 1024, BOTH, dtype="bfloat16", cuda_only=True),
    _c("lstm", 256, 32, 512, BOTH, proj_size=256),
    _c("lstm", 512, 32, 512, BOTH, packed=True),
    _c("lstm", 512, 32, 512, BOTH, lengths=True),
    _c("lstm", 256, 16, 2048, BOTH, dtype="bfloat16", cuda_only=True),  # W_hh streams from L2
    # The anchor with peephole connections, and as a CIFG (three gate blocks), against cuDNN's
    # plain LSTM of the shape.
    _c("lstm", 1024, 16, 768, BOTH, dtype="bfloat16", cuda_only=True, variant="peephole"),
    _c("lstm", 1024, 16, 768, BOTH, dtype="bfloat16", cuda_only=True, variant="cifg"),
]

# The LSTM variants torch.nn lacks, each next to the plain LSTM of its shape: "vs torch" is
# torch.nn's plain LSTM over fusedrnn's variant, the reference row the plain-PyTorch loop a user
# would otherwise write.
LSTM_VARIANTS: List[BenchConfig] = [
    _c("lstm", 100, 1, 128, INF, variant=v) for v in ("", *VARIANTS)
] + [
    _c("lstm", 100, 32, 256, TRAIN, variant=v) for v in ("", *VARIANTS)
] + [
    _c("lstm", 100, 16, 128, BOTH, bidirectional=True, packed=True, variant=v)
    for v in ("", "peephole")
] + [
    _c("lstm", 50, 1, 256, BOTH, step_calls=True, variant=v)  # streaming: one step per call
    for v in ("", *VARIANTS)
]

# torch.compile and CUDA graphs (bench/wrapped.py): each shape eager, compiled and, on a GPU,
# replayed from a CUDA graph, fusedrnn and torch.nn alike. Small shapes, where what surrounds the
# kernels (Python, dispatch, launches) is a large part of a call, the same inside a small model
# (in_model: torch.nn's RNN splits its graph), a stack whose glue (directions) the compiler sees,
# and a sequence fed one step per call.
COMPILE: List[BenchConfig] = [
    _c("lstm", 100, 1, 64, BOTH),
    _c("lstm", 100, 1, 64, BOTH, in_model=True),
    _c("lstm", 100, 16, 256, BOTH),
    _c("lstm", 100, 16, 256, BOTH, in_model=True),
    _c("gru", 100, 1, 128, BOTH),
    _c("lstm", 100, 32, 256, TRAIN, layers=2, bidirectional=True),
    _c("lstm", 50, 1, 256, INF, step_calls=True),
]

PRESETS: Dict[str, List[BenchConfig]] = {
    "quick": QUICK,
    "standard": STANDARD,
    "anchor": ANCHOR,
    "gpu": GPU,
    "streaming": STREAMING,
    "batch": BATCH,
    "variants": LSTM_VARIANTS,
    "compile": COMPILE,
}

# Implementations a preset runs when --impls does not name them (otherwise impls.DEFAULT_ORDER).
PRESET_IMPLS: Dict[str, List[str]] = {
    "compile": ["fusedrnn", "fusedrnn+compile", "fusedrnn+cudagraph",
                "torch", "torch+compile", "torch+cudagraph"],
}

PRESET_HELP = {
    "quick": "a few small CPU-relevant shapes and one streaming one, under 3 minutes on a 2-core CPU",
    "standard": "issue 4: small-batch inference, B=64 training, GRU/RNN, bidirectional, packed, the CPU targets",
    "anchor": "LSTM B=16 T=1024 H=768 in fp16, bf16 (CUDA) and fp32",
    "gpu": "the anchor plus GPU shapes where cuDNN leaves its fast path (bench/gpu_check.sh)",
    "streaming": "sequences fed one step per call (streaming inference, decoder-style training)",
    "batch": "batched inference (B=16..64), where torch.nn's CPU LSTM is strongest",
    "variants": "peephole and CIFG LSTMs (torch.nn has neither) next to the plain LSTM of each shape",
    "compile": "fusedrnn and torch.nn eager, under torch.compile and (GPU) replayed from CUDA "
               "graphs, alone and inside a small model",
}


def select(preset: str, device: str, cells: Optional[Sequence[str]] = None,
           dtypes: Optional[Sequence[str]] = None, only: Optional[Sequence[str]] = None
           ) -> Tuple[List[BenchConfig], List[str]]:
    """The configurations to run and a note for each one left out.

    cells filters; dtypes replaces every configuration's dtype (a cross product, deduplicated);
    only keeps configurations whose name contains one of these substrings (any case: h64 finds
    H64).
    """
    if preset not in PRESETS:
        raise ValueError(f"--preset: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    notes: List[str] = []
    configs = list(PRESETS[preset])
    if cells:
        wanted = {canonical_cell(c) for c in cells}
        configs = [c for c in configs if c.cell in wanted]
    if dtypes:
        wanted_dtypes = [canonical_dtype(d) for d in dtypes]
        configs = [c.replace(dtype=d) for c in configs for d in wanted_dtypes]
    if only:
        configs = [c for c in configs if any(s.lower() in c.name.lower() for s in only)]
    chosen: List[BenchConfig] = []
    seen = set()
    for c in configs:
        key = (c.name, c.modes)  # the same shape reached twice (e.g. fp16 and bf16 both made fp32)
        if key in seen:
            continue
        seen.add(key)
        if device == "cpu" and c.cuda_only and not dtypes:
            notes.append(f"{c.name}: CUDA-only configuration, skipped on cpu")
            continue
        chosen.append(c)
    return chosen, notes
