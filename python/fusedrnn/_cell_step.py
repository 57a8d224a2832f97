"""One cell step on the CPU: one native pass, with torch's GEMMs around it where they win.

A cell call (LSTMCell, GRUCell, RNNCell, the LSTM variants' peephole and CIFG cells included),
or a layer called with one time step, is a single step. Run as a sequence of length 1, the
recurrence kernel packs W_hh (G*H x H, transposed) for one use and adds a workspace, output and
state round trip: at B=1 that made fusedrnn's cells 3-7x slower than torch.nn's. Here:

  forward   B <= 2, small weights: the native pass forms x W_ih^T and h W_hh^T itself (weights
            read in place), adds the biases and applies the cell update of cell_math.h;
            otherwise torch's GEMMs form the products first (LSTM/RNN: both into one buffer;
            GRU: two, r multiplies the recurrent n part) and the pass does the rest.
            The pass writes h', c' and what the backward reads (the gates, a private c' or h').
  backward  the native pointwise backward (d_pre), then torch GEMMs for dx, dh, dW_ih, dW_hh, db

torch.nn's CPU cells do the same GEMMs but the update as ~10 separate elementwise ops.

The native pass trusts its operands: every caller first asks operand_problem() and takes the
checked sequence-of-one path (which reports bad input as torch.nn does) on any problem.

Used for float32/float64/bfloat16 CPU tensors on the `_cpu` backend outside torch.compile and
torch.jit.trace; everything else (CUDA, FUSEDRNN_BACKEND=emu, float16, recording a graph, meta
and fake tensors) keeps the sequence-of-one path of functional.cell_step, which the custom ops
make traceable. A bfloat16 step runs the float32 pass on widened operands (csrc/cpu/storage.h):
its GEMMs are torch's bfloat16 ones, as torch.nn's, and at small batch the pass reads bfloat16
weights in place. Through the recurrence instead, a bfloat16 cell ran at 0.43-0.65x torch.nn's
speed (2-core VM: LSTMCell B=1 H=128 204 against 109 us).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _backend, _recomputed_grads, _saved_layout
from ._backend import (CELL_CODES, CPU_DTYPES, DTYPE_CODES, GATE_COUNT, LSTM_CELLS,
                       PEEPHOLE_ROWS, SAVED_GATE_COUNT, _cpu)
from ._validation import FREED_STORAGE


def applies(input: Tensor, dims: int = 2) -> bool:
    """Whether a cell step of input [B, I] may run here: a non-empty CPU input of a dtype in
    CPU_DTYPES, the _cpu backend, plain eager mode (_backend.plain_eager: no graph recorded, no
    torch.func transform). The operands are then asked operand_problem(); anything else takes
    the sequence-of-one path. dims=3: the same for a one-step sequence [1, B, I]
    (without making the view of its step)."""
    # (is_cpu, not device.type: ~0.05 against ~0.3 us, and this runs at every cell call.)
    # (plain_eager before any size comparison: a size is a tensor while torch.jit.trace records.)
    if (not input.is_cpu or not _backend.plain_eager() or input.dtype not in CPU_DTYPES
            or input.dim() != dims or 0 in input.shape or _cpu is None
            or (type(input) is not Tensor and _backend.without_data(input))):  # a FakeTensor
        return False
    backend = _backend.env_value(_backend.BACKEND_VARIABLE)
    return not backend or _backend.backend_name() == "cpu"


def operand_problem(cell: str, dtype: torch.dtype, batch: int, width: int,
                    h: Optional[Tensor], c: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
                    b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor] = None,
                    peephole: Optional[Tensor] = None) -> Optional[str]:
    """What is wrong with the operands of a cell step of an input [batch, width] of `dtype`, or
    None: every tensor a CPU tensor of that dtype, shapes x [B, I], w_ih [G*H, I], w_hh [G*H, P],
    biases [G*H], h [B, P], c [B, H], w_hr [P, H], peephole [3, H] ([2, H] for lstm_cifg), with
    P = H without w_hr."""
    # One pass of plain comparisons for the common, valid call (this runs at every cell step,
    # where each microsecond shows); the messages are built only for a mismatch.
    gates, w_shape = GATE_COUNT[cell], w_hh.shape
    tensors = (h, c, w_ih, w_hh, b_ih, b_hh, w_hr, peephole)
    for t in tensors:
        if t is not None and (t.dtype is not dtype or not t.is_cpu):
            return (f"a {t.dtype} tensor on {t.device} among the operands of a {dtype} CPU cell "
                    "step")
    if len(w_shape) == 2:
        rows, state = w_shape
        hidden, lstm = rows // gates, cell in LSTM_CELLS
        state_fits = (state == hidden if w_hr is None
                      else lstm and w_hr.shape == (state, hidden))
        if (rows > 0 and rows == hidden * gates and state_fits and w_ih.shape == (rows, width)
                and (b_ih is None or b_ih.shape == (rows,))
                and (b_hh is None or b_hh.shape == (rows,))
                and (h is None or h.shape == (batch, state))
                and (c is None or (lstm and c.shape == (batch, hidden)))
                and (peephole is None
                     or (lstm and peephole.shape == _peephole_shape(cell, hidden)))):
            return None
    return _describe_shape_problem(cell, batch, width, h, c, w_ih, w_hh, b_ih, b_hh, w_hr,
                                   peephole)


def _peephole_shape(cell: str, hidden: int) -> tuple:
    return (PEEPHOLE_ROWS[cell], hidden)


def _describe_shape_problem(cell, batch, width, h, c, w_ih, w_hh, b_ih, b_hh, w_hr,
                            peephole=None):
    gates = GATE_COUNT[cell]
    if w_hh.dim() != 2 or w_hh.size(0) % gates or w_hh.size(0) == 0:
        return f"weight_hh of shape {tuple(w_hh.shape)} is not [{gates}*hidden_size, state]"
    rows, hidden, state = w_hh.size(0), w_hh.size(0) // gates, w_hh.size(1)
    lstm = cell in LSTM_CELLS
    if w_hr is None and state != hidden:
        return f"weight_hh of shape {tuple(w_hh.shape)}: expected [{rows}, {hidden}]"
    if w_hr is not None and (not lstm or w_hr.shape != (state, hidden)):
        return f"weight_hr of shape {tuple(w_hr.shape)}: expected [{state}, {hidden}]"
    if w_ih.shape != (rows, width):
        return f"weight_ih of shape {tuple(w_ih.shape)}: expected [{rows}, {width}]"
    for name, b in (("bias_ih", b_ih), ("bias_hh", b_hh)):
        if b is not None and b.shape != (rows,):
            return f"{name} of shape {tuple(b.shape)}: expected [{rows}]"
    if h is not None and h.shape != (batch, state):
        return f"hidden state of shape {tuple(h.shape)}: expected [{batch}, {state}]"
    if peephole is not None and (not lstm or peephole.shape != _peephole_shape(cell, hidden)):
        return (f"weight_peephole of shape {tuple(peephole.shape)}: expected "
                f"{list(_peephole_shape(cell, hidden))}")
    return f"cell state of shape {tuple(c.shape)}: expected [{batch}, {hidden}]"


def layer_problem(cell: str, dtype: torch.dtype, batch: int, width: int, layer_weights,
                  h0: Optional[Tensor], c0: Optional[Tensor]) -> Optional[str]:
    """operand_problem for every direction of a one-step layer whose input is [batch, width] of
    `dtype` (the other arguments as layer's). The states are checked whole, [D, batch, size],
    not direction by direction: a view per direction costs about a microsecond, and a streaming
    call makes one step per call."""
    num_dirs = len(layer_weights)
    for t in (h0, c0):
        if t is not None and (t.dtype is not dtype or not t.is_cpu or t.dim() != 3
                              or t.size(0) != num_dirs or t.size(1) != batch):
            return (f"initial states that are not [{num_dirs}, {batch}, size] {dtype} CPU tensors: "
                    f"{t.dtype} {tuple(t.shape)} on {t.device}")
    for w_ih, w_hh, b_ih, b_hh, w_hr, *peephole in layer_weights:
        problem = operand_problem(cell, dtype, batch, width, None, None, w_ih, w_hh, b_ih, b_hh,
                                  w_hr, peephole=peephole[0] if peephole else None)
        if problem is not None:
            return problem
        # operand_problem found w_hh [G*H, P] with P = H, or the W_hr [P, H] of a projection.
        if h0 is not None and h0.size(2) != w_hh.size(1):
            return f"h0 of shape {tuple(h0.shape)}: expected size {w_hh.size(1)} last"
        hidden = w_hh.size(0) // GATE_COUNT[cell]
        if c0 is not None and (cell not in LSTM_CELLS or c0.size(2) != hidden):
            return f"c0 of shape {tuple(c0.shape)}: expected size {hidden} last"
    return None


def step(cell: str, x: Tensor, h: Optional[Tensor], c: Optional[Tensor], w_ih: Tensor,
         w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
         peephole: Optional[Tensor] = None):
    """x [B, I]; h [B, P] or None (zeros); c [B, H] or None (LSTM only); peephole: an LSTM's
    peephole weights or None; operands for which the caller has found no operand_problem (the
    native pass trusts every pointer and extent). Returns h', or for an LSTM (h', c')."""
    if h is None:
        h = x.new_zeros(x.size(0), w_hh.size(1))
    if torch.is_grad_enabled() and (
            x.requires_grad or h.requires_grad or w_ih.requires_grad or w_hh.requires_grad
            or (c is not None and c.requires_grad) or (b_ih is not None and b_ih.requires_grad)
            or (b_hh is not None and b_hh.requires_grad)
            or (peephole is not None and peephole.requires_grad)):
        return _CellStep.apply(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, peephole)
    h_next, c_next, _ = _forward(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, save=False,
                                 peephole=peephole)
    return (h_next, c_next) if cell in LSTM_CELLS else h_next


def layer(cell: str, x: Tensor, layer_weights, h0: Optional[Tensor], c0: Optional[Tensor]):
    """A layer over a sequence of ONE step (a stream or a decoder fed a step per call): each
    direction is a cell step (at T=1 the reverse direction is the same step), a projected LSTM
    adding r W_hr^T. x [B, I]; layer_weights: per direction (w_ih, w_hh, b_ih, b_hh, w_hr) and
    an LSTM's peephole weights as a sixth entry where it has them;
    h0 [D, B, P], c0 [D, B, H] or None; checked by the caller (layer_problem). Returns (out
    [B, D*P], h_n [D, B, P], c_n [D, B, H] or None), differentiable."""
    hs, cs = [], []
    for d, (w_ih, w_hh, b_ih, b_hh, w_hr, *peephole) in enumerate(layer_weights):
        h = h0[d] if h0 is not None else None
        c = c0[d] if c0 is not None else None
        result = step(cell, x, h, c, w_ih, w_hh, b_ih, b_hh,
                      peephole=peephole[0] if peephole else None)
        h, c = result if cell in LSTM_CELLS else (result, None)
        if w_hr is not None:
            h = torch.mm(h, w_hr.t())
        hs.append(h)
        cs.append(c)
    # h_n is a copy: torch.nn's output and h_n never share memory (a stream may change one in
    # place and feed the other back).
    out = hs[0] if len(hs) == 1 else torch.cat(hs, 1)
    return out, torch.stack(hs), torch.stack(cs) if cell in LSTM_CELLS else None


def stack_problem(cell: str, x: Tensor, weights, h0: Optional[Tensor], c0: Optional[Tensor],
                  num_layers: int, num_dirs: int) -> Optional[str]:
    """layer_problem for every layer of a stack run by stack() on x [1, B, I]: None when all of
    its operands fit a cell step."""
    batch, width = x.size(1), x.size(2)
    for layer_index in range(num_layers):
        h0_layer, c0_layer = layer_states(h0, c0, layer_index, num_dirs)
        layer_weights = weights[layer_index * num_dirs:(layer_index + 1) * num_dirs]
        problem = layer_problem(cell, x.dtype, batch, width, layer_weights, h0_layer, c0_layer)
        if problem is not None:
            return problem
        width = num_dirs * layer_weights[0][1].size(1)  # the next layer's input: this one's output
    return None


def stack(cell: str, x: Tensor, weights, h0: Optional[Tensor], c0: Optional[Tensor],
          num_layers: int, num_dirs: int):
    """A stacked RNN over a sequence of ONE step, x [1, B, I], every layer and direction a cell
    step (layer()); weights: functional.rnn's, checked by stack_problem(); h0 [L*D, B, P], c0
    [L*D, B, H] or None. Returns (output [1, B, D*P], h_n, c_n or None)."""
    step_input = x[0]
    h_n, c_n = [], []
    for layer_index in range(num_layers):
        h0_layer, c0_layer = layer_states(h0, c0, layer_index, num_dirs)
        step_input, hn, cn = layer(
            cell, step_input, weights[layer_index * num_dirs:(layer_index + 1) * num_dirs],
            h0_layer, c0_layer)
        h_n.append(hn)
        c_n.append(cn)
    single = len(h_n) == 1
    return (step_input.unsqueeze(0), h_n[0] if single else torch.cat(h_n),
            (c_n[0] if single else torch.cat(c_n)) if cell in LSTM_CELLS else None)


def layer_states(h0: Optional[Tensor], c0: Optional[Tensor], layer_index: int, num_dirs: int):
    """The [D, B, size] slices of one layer of the initial states (None stays None); the
    states themselves when they hold one layer (a slice would be a view, ~1 us, at every step
    of a stream)."""
    if h0 is not None and h0.size(0) != num_dirs:
        h0 = h0[layer_index * num_dirs:(layer_index + 1) * num_dirs]
    if c0 is not None and c0.size(0) != num_dirs:
        c0 = c0[layer_index * num_dirs:(layer_index + 1) * num_dirs]
    return h0, c0


def _products(cell, x, h, w_ih, w_hh):
    """(xpre, hpre) without biases (the native pass adds them): for a GRU x W_ih^T and h W_hh^T;
    for LSTM and RNN their sum in xpre (hpre None), the second GEMM accumulating in place."""
    xpre = torch.mm(x, w_ih.t())
    if cell == "gru":
        return xpre, torch.mm(h, w_hh.t())
    return xpre.addmm_(h, w_hh.t()), None


# The native pass forms the products itself (one row dot product per output, reading the
# weights in place, once per batch row) up to this batch and while batch x the bytes of W_ih and
# W_hh stay under NATIVE_PRODUCTS_MAX_BYTES: there one native call beats torch's two GEMM calls,
# whose fixed cost is most of a B=1 step. Past it the weights come from beyond L2 on one thread
# and MKL's GEMMs (every thread, each weight read once) win. Measured (2-core SPR VM, fp32, 2
# threads, inference): B=1 LSTMCell H=128 (0.5 MB) 24 us native against 40 with the GEMMs, RNNCell
# B=2 H=256 (2 x 0.5 MB) 26 against 32; B=1 GRUCell H=256 (1.5 MB) 74 against 51, LSTMCell B=2
# H=256 (2 x 2 MB) 178 against 65.
NATIVE_PRODUCTS_MAX_BATCH = 2
NATIVE_PRODUCTS_MAX_BYTES = 1 << 20


def uses_native_products(batch: int, w_ih: Tensor, w_hh: Tensor) -> bool:
    """Whether a cell step of this batch forms its products in the native pass."""
    return (batch <= NATIVE_PRODUCTS_MAX_BATCH
            and batch * (w_ih.numel() + w_hh.numel()) * w_ih.element_size()
            <= NATIVE_PRODUCTS_MAX_BYTES)


def _forward(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, save: bool, peephole=None):
    """(h', c' or None, (saved gates, saved state) or None), for step()'s checked operands."""
    # (Not w_hh.size(1): a projected LSTM layer's W_hh is [4H, P].)
    batch, hidden = x.size(0), w_hh.size(0) // GATE_COUNT[cell]
    is_lstm, is_gru = cell in LSTM_CELLS, cell == "gru"
    # Every tensor whose pointer the native pass reads is bound to a name until it returns: a
    # temporary (a contiguous copy) would be freed as soon as its data_ptr() was taken.
    native_products = uses_native_products(batch, w_ih, w_hh)
    if native_products:
        xpre = hpre = None
        x, w_ih, w_hh = x.contiguous(), w_ih.contiguous(), w_hh.contiguous()
        h_prev = h.contiguous()
    else:
        xpre, hpre = _products(cell, x, h, w_ih, w_hh)
        h_prev = h.contiguous() if is_gru else None
    c_prev = _contiguous(c)
    b_ih, b_hh, peephole = _contiguous(b_ih), _contiguous(b_hh), _contiguous(peephole)
    h_next = x.new_empty(batch, hidden)
    c_next = x.new_empty(batch, hidden) if is_lstm else None
    gates = x.new_empty(batch, SAVED_GATE_COUNT[cell] * hidden) if save and (is_lstm or is_gru) else None
    saved_state = x.new_empty(batch, hidden) if save and not is_gru else None
    _cpu.cell_step_forward(
        CELL_CODES[cell], DTYPE_CODES[x.dtype], batch, hidden, _ptr(xpre), _ptr(hpre),
        _ptr(b_ih), _ptr(b_hh), _ptr(h_prev), _ptr(c_prev),
        h_next.data_ptr(), _ptr(c_next), _ptr(gates), _ptr(saved_state), torch.get_num_threads(),
        *((_ptr(x), _ptr(w_ih), _ptr(w_hh), x.size(1), w_hh.size(1))
          if native_products else (0, 0, 0, 0, 0)), _ptr(peephole))
    return h_next, c_next, ((gates, saved_state) if save else None)


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.contiguous() if t is not None else None


def _ptr(t: Optional[Tensor]) -> int:
    """t's address for the native step, 0 for None (an absent operand). A tensor whose storage
    was freed (resized to 0, as FSDP does to a sharded parameter) also has address 0: the step
    took such a bias as absent and ran without it, where torch.nn's cells raise (review,
    session 29); refused here."""
    if t is None:
        return 0
    ptr = t.data_ptr()
    if ptr == 0 and t.numel() > 0:
        raise RuntimeError(f"fusedrnn: an operand of shape {list(t.shape)} of the cell step "
                           f"{FREED_STORAGE}")
    return ptr


def states_read_by_backward(cell: str, h: Optional[Tensor], c: Optional[Tensor],
                            w_hh_needs_grad: bool, more_than_c_needs_grad: bool,
                            peephole: bool) -> tuple:
    """(h, c) as the first-order backward of a cell step or of a layer (h0, c0) reads them, None
    where it does not. Only these are saved, as torch.nn's ops save an operand only where a
    gradient reads it: a state written in place between forward and backward then raises where
    torch.nn's backward would, and only there (found by fuzzing: a frozen LSTM whose h0 buffer
    was updated after the forward, for a gradient with respect to x, raised in fusedrnn and ran
    in torch.nn).
    - h is read for dW_hh. A GRU's kernel also reads its values (the update gate's gradient);
      where dW_hh is not wanted it gets a private copy, as torch.nn's GRU saves h - n, not h.
    - c is read by the LSTM kernel for the forget gate's gradient, which reaches every gradient
      but c's own (dc_prev = dc f); with peephole connections, c's own too."""
    if h is None or w_hh_needs_grad:
        h_read = h
    else:
        h_read = h.detach().clone() if cell == "gru" else None
    return h_read, (c if peephole or more_than_c_needs_grad else None)


class _CellStep(torch.autograd.Function):
    """A cell step with autograd. Inputs: cell, x, h, c (LSTM, or None),
    w_ih, w_hh, b_ih, b_hh (None without bias), peephole (an LSTM's, or None). Outputs: h', and
    c' for an LSTM."""

    @staticmethod
    def forward(ctx, cell, x, h, c, w_ih, w_hh, b_ih, b_hh, peephole):
        h_next, c_next, (gates, saved) = _forward(cell, x, h, c, w_ih, w_hh, b_ih, b_hh,
                                                  save=True, peephole=peephole)
        ctx.cell = cell
        ctx.batch_and_hidden = h_next.shape
        ctx.set_materialize_grads(False)
        # What the pointwise backward reads: the gates and a private copy of c' (LSTM), the
        # gates (GRU), a private copy of h' (RNN); never a tensor returned to the user. The
        # peephole weights join the gradient of c (saved: a write to them before backward
        # raises, as for W_hh). x, W_ih and W_hh are saved only where a first-order gradient
        # reads them (x for d W_ih, W_ih for d x, W_hh for d h), as torch.nn's products save
        # their operands: a weight written in place between forward and backward (W_ih next to
        # an input that needs no gradient) then raises only where torch.nn's would.
        # So are h and c (states_read_by_backward).
        needs = ctx.needs_input_grad[1:]  # x, h, c, w_ih, w_hh, b_ih, b_hh, peephole
        operands, read_by_first_order = (x, w_ih, w_hh), (needs[3], needs[0], needs[1])
        saved_operands = tuple(t if need else None
                               for t, need in zip(operands, read_by_first_order))
        h_read, c_read = states_read_by_backward(
            cell, h, c, w_hh_needs_grad=needs[4], peephole=peephole is not None,
            more_than_c_needs_grad=any(needs[:2]) or any(needs[3:]))
        ctx.given_c = c is not None
        _saved_layout.save_for_backward(ctx, saved_operands[0], h_read, c_read,
                                        saved_operands[1], saved_operands[2], gates, saved,
                                        peephole)
        # The rest only for create_graph (_recomputed_grads.keep); so are the biases, which the
        # native backward never reads: a bias written in place before it is fine, as in torch.nn
        # (saved, its version check would raise).
        ctx.kept = _recomputed_grads.keep((
            b_ih, b_hh, *(t if k is None else None for t, k in zip(operands, saved_operands)),
            h if h_read is not h else None, c if c_read is not c else None))
        return (h_next, c_next) if cell in LSTM_CELLS else h_next

    @staticmethod
    @_backend.never_traced
    def backward(ctx, d_h, d_c=None):
        cell = ctx.cell
        x, h, c, w_ih, w_hh, gates, saved, peephole = _saved_layout.saved_tensors(
            ctx, "a cell step")
        # A saved_tensors_hooks unpack may return other strides than the forward saved; the
        # kernel reads gates and saved as dense rows (it gave wrong gradients silently).
        gates, saved = _contiguous(gates), _contiguous(saved)
        needs = ctx.needs_input_grad[1:]  # x, h, c, w_ih, w_hh, b_ih, b_hh, peephole
        if _recomputed_grads.applies((d_h, d_c)):  # create_graph, or batched gradients
            b_ih, b_hh, *kept = _recomputed_grads.unpack_kept(ctx.kept)
            x, w_ih, w_hh, h, c = _recomputed_grads.prefer_kept(kept, (x, w_ih, w_hh, h, c))
            return (None, *_recomputed_grads.step_grads(cell, x, h, c, w_ih, w_hh, b_ih, b_hh,
                                                        d_h, d_c, needs, peephole))
        batch, hidden = ctx.batch_and_hidden
        is_lstm, is_gru = cell in LSTM_CELLS, cell == "gru"
        like = gates if gates is not None else saved  # (h is not always saved)
        d_xpre = like.new_empty(batch, GATE_COUNT[cell] * hidden)
        d_hpre = torch.empty_like(d_xpre) if is_gru else None
        d_c_prev = like.new_empty(batch, hidden) if is_lstm else None
        d_h_direct = like.new_empty(batch, hidden) if is_gru else None
        d_h, d_c = _contiguous(d_h), _contiguous(d_c)
        c_prev, h_prev = _contiguous(c), (h.contiguous() if is_gru else None)  # named: see _forward
        peephole = _contiguous(peephole)  # (saved as given: the forward read a contiguous copy)
        _cpu.cell_step_backward(
            CELL_CODES[cell], DTYPE_CODES[like.dtype], batch, hidden, _ptr(gates),
            _ptr(saved) if is_lstm else 0, _ptr(c_prev), _ptr(h_prev),
            0 if (is_lstm or is_gru) else _ptr(saved),
            _ptr(d_h), _ptr(d_c), d_xpre.data_ptr(), _ptr(d_hpre), _ptr(d_c_prev),
            _ptr(d_h_direct), torch.get_num_threads(), _ptr(peephole))
        d_hp = d_hpre if is_gru else d_xpre  # gradient w.r.t. h W_hh^T + b_hh
        grads = [
            d_xpre.mm(w_ih) if needs[0] else None,
            (d_hp.mm(w_hh) if not is_gru else torch.addmm(d_h_direct, d_hp, w_hh))
            if needs[1] else None,
            d_c_prev if needs[2] and ctx.given_c else None,
            d_xpre.t().mm(x) if needs[3] else None,
            d_hp.t().mm(h) if needs[4] else None,
            d_xpre.sum(0) if needs[5] else None,
            d_hp.sum(0) if needs[6] else None,
            _peephole_grad(cell, d_xpre, saved, c) if needs[7] else None,
        ]
        _recomputed_grads.release_kept(ctx)
        return (None, *grads)


def _peephole_grad(cell: str, d_xpre: Tensor, c_next: Tensor, c_prev: Optional[Tensor]):
    """The peephole weights' gradient of one step: the layer's formula over a sequence of one
    (c_next [B, H] the step's c', c_prev None for zeros)."""
    from ._layer_recurrence import _peephole_grad as over_steps  # (which imports this module)
    return over_steps(d_xpre.unsqueeze(0), c_next.unsqueeze(0), c_prev, None, False,
                      coupled=cell == "lstm_cifg")
