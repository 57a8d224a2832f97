"""The native recurrence of a layer (steps 2 and 3 of functional.py's plan): the one
implementation behind both the autograd.Function (eager, `_LayerRecurrence`) and the custom ops
(torch.compile, _custom_ops.py).

Its forward runs all directions of a layer in one native call; its backward runs the native
backward recurrence and turns the gate pre-activation gradients that returns into dW_hh, db_hh
(and dW_hr) with torch GEMMs. The input projection before it is functional._layer's.

Tensors of a layer: xproj [T, B, D*G*H] (last dim dense); h0 [D, B, P], c0 [D, B, H] contiguous
or None; w_hh, b_hh, w_hr sequences of D tensors, or of D Nones where absent.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import _backend, _cell_step, _input_projection, _recomputed_grads, _saved_layout
from ._backend import GATE_COUNT, LSTM_CELLS, SAVED_GATE_COUNT

_WHAT = "an RNN layer"  # (for _saved_layout's error)


@dataclass(frozen=True)
class _LayerSpec:
    """What a layer's recurrence needs to know besides its tensors."""
    cell: str
    directions: int
    has_bias: bool
    has_proj: bool
    has_peephole: bool = False

    def split(self, params):
        """A flat sequence (w_hh x D, then b_hh x D with bias, w_hr x D with proj, peephole x D
        with peephole connections) back into w_hh, b_hh, w_hr, peephole tuples of D entries,
        Nones for the absent ones."""
        d = self.directions
        w_hh, rest = tuple(params[:d]), params[d:]
        b_hh, rest = (tuple(rest[:d]), rest[d:]) if self.has_bias else ((None,) * d, rest)
        w_hr, rest = (tuple(rest[:d]), rest[d:]) if self.has_proj else ((None,) * d, rest)
        peephole = tuple(rest[:d]) if self.has_peephole else (None,) * d
        return w_hh, b_hh, w_hr, peephole


def _forward_outputs(cell: str, xproj: Tensor, num_dirs: int, state: int, has_proj: bool,
                     lengths: Optional[Tensor], save: bool, zero_padding: bool = False,
                     gates_over_xproj: bool = False, has_peephole: bool = False):
    """Allocates what a layer's forward writes: (out, hn, cn, gates, c_seq, r_seq), None where
    the cell or mode has none; gates, c_seq, r_seq only when saving for backward. Also the fake
    kernel of layer_forward, so torch.compile sees exactly the eager shapes and strides.

    The kernels leave the rows of padded steps (lengths given) of gates, c_seq and r_seq
    unwritten. Only the dW_hr GEMM reads them (r_seq, times a zero gradient): zeros there keep
    garbage (NaN * 0) out of it. zero_padding zeros gates and c_seq too (the op's outputs must not
    depend on uninitialised memory; eagerly they are private to the autograd.Function).
    A peephole LSTM's c_seq is always zero there: its weight gradients read every row
    (_peephole_grad). gates_over_xproj: the gates are xproj itself (see
    _gates_can_overwrite_xproj)."""
    is_lstm = cell in LSTM_CELLS
    seq_len, batch = xproj.shape[0], xproj.shape[1]
    hidden = xproj.shape[2] // num_dirs // GATE_COUNT[cell]
    out = xproj.new_empty(seq_len, batch, num_dirs * state)
    hn = xproj.new_empty(num_dirs, batch, state)
    cn = xproj.new_empty(num_dirs, batch, hidden) if is_lstm else None
    gates = c_seq = r_seq = None
    if save:
        padded = lengths is not None
        saved = xproj.new_zeros if padded and zero_padding else xproj.new_empty
        saved_width = SAVED_GATE_COUNT[cell] * hidden
        if gates_over_xproj:  # [D, T, B, S*H] view: direction d's gates over its xproj columns
            gates = xproj.view(seq_len, batch, num_dirs, -1).permute(2, 0, 1, 3)
        else:
            gates = saved(num_dirs, seq_len, batch, saved_width) if saved_width else None
        c_saved = xproj.new_zeros if padded and has_peephole else saved
        c_seq = c_saved(num_dirs, seq_len, batch, hidden) if is_lstm else None
        if has_proj:
            r_seq = (xproj.new_zeros if padded else xproj.new_empty)(
                num_dirs, seq_len, batch, hidden)
    return out, hn, cn, gates, c_seq, r_seq


def _run_forward(cell: str, xproj, h0, c0, w_hh, b_hh, w_hr, lengths, save: bool,
                 zero_padding: bool = False, xproj_is_scratch: bool = False, peephole=()):
    """Allocates the outputs (and, with save, what backward needs) and runs the native forward of
    all directions in one call. Returns _forward_outputs' tuple. The callers have checked the
    arguments (the native call trusts their sizes, dtype and device).

    xproj_is_scratch: the caller owns xproj and will not read it again, so where the backend
    allows it the saved gates overwrite it instead of taking a tensor of their own."""
    over = xproj_is_scratch and save and _gates_can_overwrite_xproj(cell, xproj)
    results = _forward_outputs(cell, xproj, len(w_hh), w_hh[0].shape[1], w_hr[0] is not None,
                               lengths, save, zero_padding, gates_over_xproj=over,
                               has_peephole=bool(peephole))
    out, hn, cn, gates, c_seq, r_seq = results
    _backend.forward_layer(cell, xproj, [w.contiguous() for w in w_hh],
                           [_contiguous(b) for b in b_hh], [_contiguous(w) for w in w_hr],
                           h0, c0, out, hn, cn, gates, c_seq, r_seq, lengths,
                           _present_contiguous(peephole))
    return results


def _backward_outputs(cell: str, out: Tensor, num_dirs: int, gates_width: int, state: int,
                      has_proj: bool, d_xproj: Optional[Tensor] = None):
    """Allocates what the native backward writes: (d_xproj, d_hproj, d_h_seq, d_h0, d_c0), None
    where the cell has none (d_xproj: given, see _run_backward). Also the fake kernel of
    layer_backward."""
    seq_len, batch = out.shape[0], out.shape[1]
    hidden = gates_width // GATE_COUNT[cell]
    if d_xproj is None:
        d_xproj = out.new_empty(seq_len, batch, num_dirs * gates_width)
    # LSTM and RNN: the gradient of the recurrent product equals d_xproj (params.h).
    d_hproj = out.new_empty(seq_len, batch, num_dirs * gates_width) if cell == "gru" else None
    d_h_seq = out.new_empty(num_dirs, seq_len, batch, state) if has_proj else None
    d_h0 = out.new_empty(num_dirs, batch, state)
    d_c0 = out.new_empty(num_dirs, batch, hidden) if cell in LSTM_CELLS else None
    return d_xproj, d_hproj, d_h_seq, d_h0, d_c0


def _run_backward(cell: str, w_hh, b_hh, w_hr, h0, c0, out, gates, c_seq, d_out, d_hn, d_cn,
                  lengths, peephole=(), d_xproj_over_gates: bool = False):
    """The native backward recurrence of all directions in one call (d_out, d_hn, d_cn: None
    for zero). Returns _backward_outputs' tuple.

    d_xproj_over_gates: the gates lie over the forward's xproj (_gates_can_overwrite_xproj) and
    are read by nothing after this call, so d_xproj is written over them, in that buffer."""
    d_xproj = None
    if d_xproj_over_gates:
        d_xproj = gates.permute(1, 2, 0, 3).reshape(gates.shape[1], gates.shape[2], -1)
    grads = _backward_outputs(cell, out, len(w_hh), w_hh[0].shape[0], w_hh[0].shape[1],
                              w_hr[0] is not None, d_xproj)
    _backend.backward_layer(
        cell, [w.contiguous() for w in w_hh], [_contiguous(b) for b in b_hh],
        [_contiguous(w) for w in w_hr], h0, c0, out, gates, c_seq, _last_dim_contiguous(d_out),
        _contiguous(d_hn), _contiguous(d_cn), *grads, lengths, _present_contiguous(peephole))
    return grads


def _layer_grads(spec: _LayerSpec, saved, d_out, d_hn, d_cn, needs, run_backward,
                 given: Optional[tuple] = None) -> tuple:
    """The gradients of a layer's recurrence: (d_xproj, d_h0, d_c0, then one per flat param:
    w_hh x D, b_hh x D with bias, w_hr x D with proj, peephole x D), None where not needed.

    saved: (lengths, h0, c0, out, gates, c_seq, r_seq, *params) as the forward saved them;
    needs: one bool per flat param; run_backward: _run_backward, or while compiling the
    layer_backward op around it; given: whether the layer had h0 and c0, where the saved ones
    may be None without meaning zeros (_first_order_reads). The native backward gives the
    gradients of xproj and the states and the gate pre-activation gradients; torch GEMMs turn
    those into dW_hh, db_hh and dW_hr. With create_graph (reached only by the custom op: the
    eager Function recomputes, _recomputed_grads) the results are tagged so that
    differentiating them raises."""
    # Compiled graphs never differentiate their backward (AOTAutograd refuses double backward
    # itself), so no tag is traced into them.
    create_graph = torch.is_grad_enabled() and not torch.compiler.is_compiling()
    # A saved_tensors_hooks unpack may return other strides than the forward saved; the native
    # backward reads dense tensors (it raised an internal error on a non-contiguous c_seq).
    saved = tuple(_contiguous(t) for t in saved)
    with torch.no_grad():
        grads = _layer_weight_grads(spec, saved, d_out, d_hn, d_cn, needs, run_backward, given)
    return _NoDoubleBackward.mark(grads, (*saved, d_out, d_hn, d_cn)) if create_graph else grads


def _layer_weight_grads(spec: _LayerSpec, saved, d_out, d_hn, d_cn, needs, run_backward,
                        given: Optional[tuple] = None):
    lengths, h0, c0, out, gates, c_seq, r_seq, *params = saved
    has_h0, has_c0 = given if given is not None else (h0 is not None, c0 is not None)
    w_hh, b_hh, w_hr, peephole = spec.split(params)
    num_dirs = spec.directions
    d_xproj, d_hproj, d_h_seq, d_h0, d_c0 = run_backward(
        spec.cell, w_hh, b_hh, w_hr, h0, c0, out, gates, c_seq, d_out, d_hn, d_cn, lengths,
        peephole if spec.has_peephole else ())
    gates_width = d_xproj.shape[2] // num_dirs
    state, hidden = out.shape[2] // num_dirs, gates_width // GATE_COUNT[spec.cell]

    d_pre = d_hproj if d_hproj is not None else d_xproj
    # needs: w_hh x D, then b_hh x D, w_hr x D, peephole x D where the layer has them.
    needs_bias = needs[num_dirs:] if spec.has_bias else ()
    needs_proj = needs[num_dirs * (1 + spec.has_bias):] if spec.has_proj else ()
    needs_peephole = needs[num_dirs * (1 + spec.has_bias + spec.has_proj):]
    d_bias = None
    if spec.has_bias and any(needs_bias[:num_dirs]):
        d_bias = _input_projection.row_sum(d_pre)  # every direction's db_hh at once
    # W_hr is read only where a step's h is made: with one step and no gradient on out or h_n
    # (a loss on c_n alone), nothing reaches it, and torch.nn leaves its grad None, not zeros.
    reaches_w_hr = d_out is not None or d_hn is not None or out.shape[0] > 1
    d_w_hh, d_b_hh, d_w_hr, d_peephole = [], [], [], []
    for d in range(num_dirs):
        d_pre_d = d_pre[:, :, d * gates_width:(d + 1) * gates_width]
        d_w_hh.append(_recurrent_weight_grad(d_pre_d, out[:, :, d * state:(d + 1) * state],
                                             h0[d] if h0 is not None else None, lengths,
                                             reverse=d == 1)
                      if needs[d] else None)
        if spec.has_bias:
            d_b_hh.append(d_bias[d * gates_width:(d + 1) * gates_width]
                          if needs_bias[d] else None)
        if spec.has_proj:
            # dW_hr = sum_t d_h_t^T r_t, with r_t = o_t * tanh(c_t) the input of W_hr.
            d_w_hr.append(d_h_seq[d].reshape(-1, state).t().mm(r_seq[d].reshape(-1, hidden))
                          if needs_proj[d] and reaches_w_hr else None)
        if spec.has_peephole:
            d_peephole.append(_peephole_grad(d_pre[:, :, d * gates_width:(d + 1) * gates_width],
                                             c_seq[d], c0[d] if c0 is not None else None,
                                             lengths, reverse=d == 1,
                                             coupled=spec.cell == "lstm_cifg")
                              if needs_peephole[d] else None)
    return (d_xproj, d_h0 if has_h0 else None, d_c0 if has_c0 else None,
            *d_w_hh, *d_b_hh, *d_w_hr, *d_peephole)


def _first_order_reads(spec: _LayerSpec, seq_len: int, h0: Optional[Tensor],
                       c0: Optional[Tensor], needs) -> tuple:
    """What a layer's first-order backward reads of h0, c0 and W_hh, given which of the
    layer's inputs need a gradient (needs: _LayerRecurrence's needs_input_grad): (h0 or a
    private copy of it or None, c0 or None, whether W_hh is read). Only these are saved; the
    states follow the cell step's rules (_cell_step.states_read_by_backward). W_hh carries a
    gradient to an earlier state: read after more than one step, or for dh0 (a weight written
    in place after a one-step forward, with no gradient for h0, is fine, as in torch.nn)."""
    h0_read, c0_read = _cell_step.states_read_by_backward(
        spec.cell, h0, c0, w_hh_needs_grad=any(needs[6:6 + spec.directions]),
        more_than_c_needs_grad=any(needs[2:4]) or any(needs[5:]), peephole=spec.has_peephole)
    return h0_read, c0_read, seq_len > 1 or needs[3]


def _peephole_grad(d_pre: Tensor, c_seq: Tensor, c0: Optional[Tensor],
                   lengths: Optional[Tensor], reverse: bool, coupled: bool = False) -> Tensor:
    """d(w_ci, w_cf, w_co) [3, H] = sums over steps and rows of (d_i c_{t-1}, d_f c_{t-1},
    d_o c_t) for one direction: d_pre [T, B, 4H] the gate pre-activation gradients (zero rows at
    padded steps), c_seq [T, B, H] the cell states after each step (zero rows at padded steps:
    _forward_outputs), c0 [B, H] or None for zeros. coupled (a CIFG): d_pre [T, B, 3H] of f, g, o
    (d_f counts the input gate's share too) and d(w_cf, w_co) [2, H].

    c_{t-1} (params.h) is c_seq one step earlier in processing order: c_seq[t-1] going forward,
    c_seq[t+1] going backward (a padded row, zero, at each sequence's last valid step), and c0 at
    each sequence's first step."""
    seq_len, batch = d_pre.shape[0], d_pre.shape[1]
    if coupled:
        d_f, _, d_o = d_pre.chunk(3, dim=2)
        seeing_c_prev = (d_f,)
    else:
        d_i, d_f, _, d_o = d_pre.chunk(4, dim=2)
        seeing_c_prev = (d_i, d_f)
    grads = None
    if seq_len > 1:  # (a single step, a cell step's, has nothing but c0 before it)
        now, before = ((slice(None, -1), slice(1, None)) if reverse
                       else (slice(1, None), slice(None, -1)))
        grads = [(d[now] * c_seq[before]).sum((0, 1)) for d in seeing_c_prev]
    first = _first_step(seq_len, batch, lengths, reverse, d_pre.device)
    at_first = [(d[first] * c0).sum(0) if c0 is not None else _times_zero_state(d[first])
                for d in seeing_c_prev]
    grads = at_first if grads is None else [g + a for g, a in zip(grads, at_first)]
    return torch.stack([*grads, (d_o * c_seq).sum((0, 1))])


class _LayerRecurrence(torch.autograd.Function):
    """The recurrence of all directions of one layer, eagerly. Inputs: spec, lengths,
    xproj [T, B, D*G*H], h0 [D, B, P] or None, c0 [D, B, H] or None, projection (x, w_ih, b_ih)
    whose F.linear is xproj (for create_graph: _recomputed_grads), then w_hh x D, b_hh x D
    (with bias), w_hr x D (with proj), peephole x D (with peephole connections). Outputs:
    out [T, B, D*P], hn [D, B, P] (and cn [D, B, H] for LSTM)."""

    @staticmethod
    def forward(ctx, spec: _LayerSpec, lengths, xproj, h0, c0, projection, *params):
        w_hh, b_hh, w_hr, peephole = spec.split(params)
        needs = ctx.needs_input_grad
        h0_read, c0_read, w_hh_read = _first_order_reads(spec, xproj.shape[0], h0, c0, needs)
        # Only W_hr needs a gradient, and one step's c_n does not depend on it (r_1 W_hr^T makes
        # h_1, after c_1): c_n then requires no grad, as torch.nn's.
        w_hh_needs, b_hh_needs, _, peephole_needs = spec.split(needs[6:])
        c_n_constant = spec.has_proj and xproj.shape[0] == 1 and not any(
            (*needs[2:5], *w_hh_needs, *b_hh_needs, *peephole_needs))
        # xproj is functional._layer's own projection, read by nothing after this call (its
        # autograd node, the linear's, keeps its inputs, not its result): the gates may overwrite
        # it.
        out, hn, cn, gates, c_seq, r_seq = _run_forward(
            spec.cell, xproj, h0, c0, w_hh, b_hh, w_hr, lengths, save=True,
            xproj_is_scratch=True, peephole=peephole if spec.has_peephole else ())
        ctx.spec = spec
        ctx.gates_over_xproj = gates is not None and gates.data_ptr() == xproj.data_ptr()
        ctx.set_materialize_grads(False)
        if c_n_constant:
            ctx.mark_non_differentiable(cn)
        ctx.given = (h0 is not None, c0 is not None)
        saved_params = (*(w_hh if w_hh_read else (None,) * spec.directions),
                        *_unsaved_biases(spec, params)[spec.directions:])
        _saved_layout.save_for_backward(ctx, lengths, h0_read, c0_read, out, gates, c_seq, r_seq,
                                        *saved_params)
        # For create_graph only (_recomputed_grads.keep), what the first-order backward does not
        # read: the projection's operands, b_hh (a bias written in place before a first-order
        # backward is fine, as in torch.nn), and the states and W_hh where not saved above as
        # themselves.
        ctx.kept = _recomputed_grads.keep((
            *projection, *b_hh, *(s if read is not s else None
                                  for s, read in ((h0, h0_read), (c0, c0_read))),
            *(w_hh if not w_hh_read else (None,) * spec.directions)))
        ctx.w_hh_shape = w_hh[0].shape
        return (out, hn, cn) if spec.cell in LSTM_CELLS else (out, hn)

    @staticmethod
    @_backend.never_traced
    def backward(ctx, d_out, d_hn, d_cn=None):
        # Where the gates lie over the forward's xproj, d_xproj can take that buffer over: no
        # new [T, B, D*4H] tensor (its page faults: ~1500 per layer of a bidirectional B=32
        # T=100 H=256 LSTM), and each d_xproj store hits the line its gates load just fetched.
        # Measured on the 2-core VM, LSTM training calls: B=64 T=50 H=256 38.6-42.1 -> 36.1-39.3
        # ms, H=512 143.6-146.4 -> 140.7-141.6 ms. Not when the graph is kept (retain_graph,
        # create_graph): a second backward reads the same saved gates again.
        if _recomputed_grads.applies((d_out, d_hn, d_cn)):  # create_graph, or batched gradients
            lengths, h0, c0, _, _, _, _, *params = _saved_layout.saved_tensors(ctx, _WHAT)
            w_hh, _, w_hr, peephole = ctx.spec.split(params)
            projection, b_hh, states, kept_w_hh = _LayerRecurrence._unpack_kept(ctx)
            h0, c0 = _recomputed_grads.prefer_kept(states, (h0, c0))
            w_hh = _recomputed_grads.prefer_kept(kept_w_hh, w_hh)
            needs = ctx.needs_input_grad
            grads = _recomputed_grads.layer_grads(
                ctx.spec.cell, projection, lengths, h0, c0, w_hh, b_hh, w_hr,
                (d_out, d_hn, d_cn), (*needs[2:5], *needs[6:]),
                peephole if ctx.spec.has_peephole else ())
            return (None, None, *grads[:3], None, *grads[3:])
        run_backward = _run_backward
        if ctx.gates_over_xproj and not torch._C._autograd._get_current_graph_task_keep_graph():
            run_backward = functools.partial(_run_backward, d_xproj_over_gates=True)
        saved = _saved_layout.saved_tensors(ctx, _WHAT)
        if saved[7] is None:  # W_hh unsaved: not read (_first_order_reads), any values will do
            stand_in = saved[3].new_zeros(ctx.w_hh_shape)
            saved = (*saved[:7], *(stand_in,) * ctx.spec.directions,
                     *saved[7 + ctx.spec.directions:])
        grads = _layer_grads(ctx.spec, saved, d_out, d_hn, d_cn, ctx.needs_input_grad[6:],
                             run_backward, ctx.given)
        _recomputed_grads.release_kept(ctx)
        return (None, None, *grads[:3], None, *grads[3:])

    @staticmethod
    def _unpack_kept(ctx) -> tuple:
        """ctx.kept, unpacked: projection (x, w_ih, b_ih), b_hh (D), the states (h0, c0) and
        W_hh (D), Nones where saved instead."""
        kept, d = _recomputed_grads.unpack_kept(ctx.kept), ctx.spec.directions
        return kept[:3], kept[3:3 + d], kept[3 + d:5 + d], kept[5 + d:]


class _NoDoubleBackward(torch.autograd.Function):
    """Tags gradients computed with create_graph=True by the layer_forward op outside a
    compiled graph (a traced or scripted model run eagerly) so that differentiating them again
    raises (the native backward is not itself differentiable; torch.nn's cuDNN RNNs behave the
    same), instead of silently missing the second-order terms of the recurrence."""

    @staticmethod
    def mark(grads: tuple, computed_from) -> tuple:
        """grads, each behind the tag's node; computed_from: every tensor they were computed
        from (saved inputs and outputs, incoming gradients). The node takes those as inputs too,
        so that every path from a gradient back to a leaf runs through it. With the gradients
        alone as its inputs (once_differentiable's way), torch.autograd.grad(penalty(grads),
        params) found no path through the node, never ran it, and returned only the terms of
        the differentiable ops after the recurrence (the input GEMM's): a silently wrong
        gradient penalty."""
        tensors = [g for g in grads if g is not None]
        sources = [t for t in computed_from if isinstance(t, Tensor) and t.requires_grad]
        # Detached inputs that require grad give the outputs a grad_fn even where no source
        # requires grad (like once_differentiable).
        marked = iter(_NoDoubleBackward.apply(
            len(tensors), *(t.detach().requires_grad_() for t in tensors), *sources))
        return tuple(next(marked) if g is not None else None for g in grads)

    @staticmethod
    def forward(ctx, count, *tensors):
        return tuple(g.view_as(g) for g in tensors[:count])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(_DOUBLE_BACKWARD_ERROR)


_DOUBLE_BACKWARD_ERROR = (
    "fusedrnn: double backward (differentiating a gradient of an LSTM/GRU/RNN) is not supported "
    "in a traced, scripted or compiled graph, like torch.nn's cuDNN RNNs; run the model eagerly "
    "(create_graph then recomputes the layers as fusedrnn.reference's ops) or use torch.func")


def _unsaved_biases(spec: _LayerSpec, params) -> tuple:
    """A layer's flat params as its backward keeps them: b_hh as None. The backward reads no
    bias value (params.h), so a bias written in place between forward and backward is fine, as in
    torch.nn (saved, its version check would raise); create_graph's tag still reaches b_hh
    through the saved `out`, an output of the node b_hh is an input of."""
    d = spec.directions
    if not spec.has_bias:
        return tuple(params)
    return (*params[:d], *(None,) * d, *params[2 * d:])


def _gates_can_overwrite_xproj(cell: str, xproj: Tensor) -> bool:
    """Whether the native forward may write the saved gates over xproj (params.h): the CPU
    kernel reads a row's xproj before it writes that row's gates, for the same units on the same
    thread, so an LSTM (4H gates saved per direction, 4H of xproj; a CIFG 3H and 3H) can save its
    gates in place, each direction over its own columns. That saves a [D, T, B, S*H] tensor per
    layer and call, its page faults and its traffic: each gates store hits the line its xproj
    load just fetched."""
    return (cell in LSTM_CELLS and xproj.device.type == "cpu" and _backend.backend_name() == "cpu"
            and xproj.is_contiguous())


def _recurrent_weight_grad(d_pre: Tensor, out: Tensor, h0: Optional[Tensor],
                           lengths: Optional[Tensor], reverse: bool) -> Tensor:
    """dW_hh = sum_t d_pre_t^T h_prev_t for one direction, as two GEMMs and no copy of h_prev.

    h_prev_t (params.h) is out_{t-1} going forward (h0 at t = 0), out_{t+1} going backward (h0 at
    each sequence's last valid step). Rows where h_prev is a padded output are zeros (and padded
    steps have zero gradient rows), so only the h0 rows need the lengths.
    """
    seq_len, batch, gates_width = d_pre.shape
    state = out.shape[2]
    if reverse:
        grad = _input_projection.weight_grad(d_pre[:-1].reshape(-1, gates_width),
                                             out[1:].reshape(-1, state))
    else:
        grad = _input_projection.weight_grad(d_pre[1:].reshape(-1, gates_width),
                                             out[:-1].reshape(-1, state))
    first = d_pre[_first_step(seq_len, batch, lengths, reverse, d_pre.device)]
    if h0 is not None:
        grad.addmm_(first.t(), h0)  # in place: grad is this function's own fresh result
    else:
        grad.add_(_times_zero_state(first).unsqueeze(1))
    return grad


def _first_step(seq_len: int, batch: int, lengths: Optional[Tensor], reverse: bool,
                device: torch.device):
    """The index, into a [T, B, ...] tensor, of each sequence's first step in processing order
    (the step that reads h0 and c0): 0 going forward, each sequence's last valid step going
    backward."""
    if not reverse:
        return 0
    if lengths is None:
        return seq_len - 1
    return (lengths - 1, torch.arange(batch, device=device))


def _times_zero_state(rows: Tensor) -> Tensor:
    """What rows^T times a zero initial state sums to, per column of rows: zero, or NaN where the
    column holds a NaN or an infinity. torch.nn multiplies its zero h0 (and c0) by the first
    step's gate gradients; the kernels skip that product, which would turn a NaN in x into a zero
    W_hh gradient where torch.nn's is NaN (found by fuzzing: a packed batch whose longest sequence
    is 1). An elementwise pass over one step's rows, no GEMM and no host sync."""
    return (rows * 0).sum(0)


# --- small helpers --------------------------------------------------------------------------------

def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.contiguous() if t is not None else None


def _present_contiguous(tensors) -> list:
    """A list argument with Nones for absent (_LayerSpec.split) as the native call takes it:
    the tensors, contiguous, or [] where absent."""
    return [t.contiguous() for t in tensors if t is not None]


def _last_dim_contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    """Sequence tensors may have any T and B strides but need a dense last dimension."""
    if t is None:
        return None
    return t if t.stride(2) == 1 else t.contiguous()
