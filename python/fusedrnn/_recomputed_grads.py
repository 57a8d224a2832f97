"""Gradients that can be differentiated again (create_graph=True: a gradient penalty, MAML,
Hessian-vector products).

The native backward is a kernel, not a composition of torch ops, so its results carry no graph.
Under create_graph the eager layer and cell step (_layer_recurrence._LayerRecurrence,
_cell_step._CellStep) therefore run their forward again as fusedrnn.reference's plain torch ops,
from the same inputs, and let autograd form the gradients with a graph: torch.nn's own CPU route
and speed, for this one backward. The first-order results equal the native ones to rounding.

The layer's recurrence receives xproj = x W_ih^T + b_ih, which the forward may have overwritten
with its saved gates. So the recomputation projects x again, differentiably: the gradient it
returns for xproj then depends on x and W_ih through that new projection, and autograd carries
d_xproj into x and W_ih through the original projection's (differentiable) backward. Both paths
exist, as they would in a graph of plain ops.

The recomputation reads each input through an alias of its own (_own_node) and differentiates
with respect to those aliases. The saved inputs keep their history, and the same weight may
reach the layer by more than one road (h0 computed from W_hh, x from W_ih's layer above):
torch.autograd.grad with respect to W_hh itself sums every road from the outputs to it, those
through h0 and x too, which autograd then adds again when it carries d_h0 and d_x back
(a first-order gradient 2.5x torch.nn's for an RNN whose h0 was a function of W_hh). Through the
aliases, each gradient counts only the direct road, as the native backward's does, and still
keeps its graph back to the original tensor.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C._autograd import SavedTensor, _make_saved_tensor

from . import _saved_layout, reference
from ._backend import reference_cell


def applies(grads) -> bool:
    """Whether the backward of a layer or cell step (_layer_recurrence._LayerRecurrence,
    _cell_step._CellStep), given its incoming gradients, takes this recomputation instead of the
    native backward: under create_graph (grad mode on in the backward: gradients that can be
    differentiated again), and under torch.autograd.grad(is_grads_batched=True) or
    torch.autograd.functional's vectorized jacobian/hessian, whose legacy vmap hands in batched
    gradients with no memory of their own for the kernels (then first order only)."""
    return torch.is_grad_enabled() or any(
        isinstance(g, Tensor) and torch._C._functorch.is_legacy_batchedtensor(g) for g in grads)


def keep(tensors) -> tuple:
    """Tensors a recomputation reads that the first-order backward does not (so not in
    ctx.save_for_backward, whose version check would make a write between forward and a
    first-order backward raise where torch.nn's does not).

    Under a saved_tensors_hooks pack hook, each is held as autograd holds a saved input
    (torch._C._autograd._make_saved_tensor): the hook sees it at the forward, as it sees every
    tensor torch.nn's ops save, so save_on_cpu, activation offloading and non-reentrant
    checkpointing free it on the device. (Held by reference, a layer's input and its initial
    states outlived the forward under those hooks, which torch.nn's do not.) Without a hook a
    SavedTensor would hold the tensor and its version, which is what is held then, for ~0.8 us
    less a tensor: with SavedTensors on every call, an LSTMCell(16, 32) training step at B=1
    (forward and backward) measured 147 us against 137 us before them.

    unpack_kept raises autograd's error where one was written in place since the forward; under
    a hook it returns the values the forward read. None stays None, and a tensor made in
    inference mode is held as itself: it has no version counter (reading one raised, so a
    batch_first input made under inference_mode failed in training where torch.nn's runs:
    review, session 30), autograd refuses to save it, and it cannot be written outside that
    mode."""
    if not _saved_layout.under_pack_hook():
        return tuple(t if t is None or t.is_inference() else (t, t._version) for t in tensors)
    return tuple(t if t is None or t.is_inference() else _make_saved_tensor(t, is_output=False)
                 for t in tensors)


def unpack_kept(kept: tuple) -> tuple:
    """The tensors keep() held, for the recomputation."""
    return tuple(_unpacked(k) for k in kept)


def _unpacked(k):
    if isinstance(k, SavedTensor):
        return k.unpack()
    if k is None or isinstance(k, Tensor):  # (an inference tensor under a hook)
        return k
    t, version = k
    if t._version != version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            f"inplace operation: [{t.type()} {list(t.shape)}] is at version {t._version}; "
            f"expected version {version} instead. (fusedrnn's backward with create_graph=True "
            "runs the layer again from its input, states and weights, so none of them may be "
            "written between the forward and that backward.)")
    return t


def release_kept(ctx) -> None:
    """At the end of a first-order backward, drops what keep() held, as autograd frees the
    saved tensors then (a pack hook's copies are in it); kept where the graph is (retain_graph:
    a create_graph backward may follow)."""
    if not torch._C._autograd._get_current_graph_task_keep_graph():
        ctx.kept = None


def prefer_kept(kept: Sequence, saved: Sequence) -> tuple:
    """Each tensor a backward reads, from unpack_kept's results where the forward kept one, else
    from ctx.saved_tensors (the forward either saved a tensor as itself or kept it; a GRU's state
    both, the saved one a private copy)."""
    return tuple(k if k is not None else s for k, s in zip(kept, saved))


def layer_grads(cell: str, projection: tuple, lengths: Optional[Tensor], h0: Optional[Tensor],
                c0: Optional[Tensor], w_hh: Sequence[Tensor], b_hh: Sequence[Optional[Tensor]],
                w_hr: Sequence[Optional[Tensor]], grad_outputs: tuple, needs: Sequence[bool],
                peephole: Sequence[Optional[Tensor]] = ()) -> tuple:
    """A layer's gradients (d_xproj, d_h0, d_c0, *d_w_hh, *d_b_hh, *d_w_hr, *d_peephole: the
    biases, projections and peephole weights only where the layer has them), with graphs.

    projection: (x, w_ih, b_ih), whose F.linear is the layer's xproj [T, B, D*G*H] (b_ih None
    where absent or folded into b_hh); w_hh, b_hh, w_hr: per direction, as the kernel got them
    (Nones where absent); grad_outputs: (d_out, d_hn, d_cn), None for zero; needs: one bool per
    returned gradient. With grad mode off (is_grads_batched: first order only), the same
    gradients without graphs."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():  # the recomputation records its graph in either case
        x, w_ih, b_ih = projection
        xproj = F.linear(x, w_ih, b_ih)
        h0, c0 = _own_node(h0), _own_node(c0)
        w_hh, b_hh, w_hr = ([_own_node(t) for t in ts] for ts in (w_hh, b_hh, w_hr))
        peephole = [_own_node(t) for t in peephole]
        width = w_hh[0].shape[0]
        ref_cell, coupled = reference_cell(cell)
        outs, hns, cns = [], [], []
        for d in range(len(w_hh)):
            out, hn, cn = reference.rnn_layer(
                ref_cell, xproj[..., d * width:(d + 1) * width], None, w_hh[d],
                None, b_hh[d], w_hr[d], h0[d] if h0 is not None else None,
                c0[d] if c0 is not None else None, lengths, reverse=d == 1,
                peephole=peephole[d] if peephole else None, coupled_input_forget=coupled)
            outs.append(out)
            hns.append(hn)
            cns.append(cn)
        results = (torch.cat(outs, 2), torch.stack(hns), torch.stack(cns) if cns[0] is not None
                   else None)
        params = [*w_hh, *(b for b in b_hh if b is not None), *(w for w in w_hr if w is not None),
                  *(w for w in peephole if w is not None)]
        return _grads(results, grad_outputs, [xproj, h0, c0, *params], needs, create_graph)


def step_grads(cell: str, x: Tensor, h: Optional[Tensor], c: Optional[Tensor], w_ih: Tensor,
               w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], d_h: Optional[Tensor],
               d_c: Optional[Tensor], needs: Sequence[bool],
               peephole: Optional[Tensor] = None) -> tuple:
    """A cell step's gradients (d_x, d_h, d_c, d_w_ih, d_w_hh, d_b_ih, d_b_hh, d_peephole), with
    graphs. h, c: None for zeros; d_h, d_c: None for zero; peephole: an LSTM's or None; needs:
    one bool per gradient. The step runs as reference.rnn_layer over a sequence of one (its
    final states are the step's results; a projected LSTM's step returns r, W_hr being applied
    after it). With grad mode off (is_grads_batched), the same gradients without graphs."""
    create_graph = torch.is_grad_enabled()
    ref_cell, coupled = reference_cell(cell)
    with torch.enable_grad():
        x, h, c, w_ih, w_hh, b_ih, b_hh, peephole = (
            _own_node(t) for t in (x, h, c, w_ih, w_hh, b_ih, b_hh, peephole))
        _, h_next, c_next = reference.rnn_layer(ref_cell, x.unsqueeze(0), w_ih,
                                                w_hh, b_ih, b_hh, None, h, c, peephole=peephole,
                                                coupled_input_forget=coupled)
        return _grads((h_next, c_next), (d_h, d_c),
                      [x, h, c, w_ih, w_hh, b_ih, b_hh, peephole], needs, create_graph)


def _own_node(t: Optional[Tensor]) -> Optional[Tensor]:
    """t behind a node of its own (a view of it), where it requires grad: the gradient with
    respect to that node is the recomputation's direct one (module docstring)."""
    return t.view_as(t) if t is not None and t.requires_grad else t


def _grads(results, grad_outputs, inputs: list, needs: Sequence[bool],
           create_graph: bool) -> tuple:
    """The gradients of `inputs` (None where not needed) from results and their incoming
    gradients."""
    pairs = [(r, g) for r, g in zip(results, grad_outputs) if r is not None and g is not None]
    wanted = [i for i, (t, need) in enumerate(zip(inputs, needs))
              if need and t is not None and t.requires_grad]
    grads: list = [None] * len(inputs)
    if pairs and wanted:
        found = torch.autograd.grad([r for r, _ in pairs], [inputs[i] for i in wanted],
                                    [g for _, g in pairs], create_graph=create_graph,
                                    allow_unused=True)
        for i, g in zip(wanted, found):
            grads[i] = g
    return tuple(grads)
