"""Drop-in replacements for torch.nn.LSTMCell, GRUCell and RNNCell, on the native kernels.

Constructor signatures, parameter names/shapes/initialisation, the forward contract (batched and
unbatched input, optional hx) and the exception classes of bad input are torch.nn's, as for the
sequence modules (modules.py). A step runs on the native cell step (_cell_step.py), or as
`functional.cell_step` (under torch.jit.script, _script.cell_step); this file only adapts
torch.nn's calling conventions to it.
"""

from typing import Optional

import torch
from torch import Tensor, nn

from . import _backend, _cell_step, _fx_leaf, _script, reference
from . import _validation as check
from . import functional
from ._backend import LSTM_CELLS
from ._module_checks import (_check_parameters, _check_variant_flags, _checked_call,
                             _follow_autocast, _is_state, _refuse_missing_weight,
                             _refuse_variant, _reset_uniform, _variant_repr)

_CELL_WEIGHT_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", None, "weight_peephole")


class RNNCellBase(nn.Module):
    """What LSTMCell, GRUCell and RNNCell share: torch.nn's parameters and initialisation."""

    _is_variant = _has_peephole = False  # as RNNBase's

    def __init__(self, input_size: int, hidden_size: int, bias: bool, num_chunks: int,
                 device=None, dtype=None):
        super().__init__()
        input_size, hidden_size = check.check_cell_arguments(input_size, hidden_size, bias)
        factory = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        # The LSTM variants (LSTMCell's keyword arguments): set on the instance before this runs.
        coupled = self.__dict__.get("coupled_input_forget", False)
        peephole = self.__dict__.get("peephole", False)
        self._is_variant = coupled or peephole
        self._has_peephole = peephole
        if coupled:
            num_chunks = 3
        self.weight_ih = nn.Parameter(torch.empty((num_chunks * hidden_size, input_size), **factory))
        self.weight_hh = nn.Parameter(torch.empty((num_chunks * hidden_size, hidden_size), **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        if peephole:  # as LSTM's weight_peephole_l0
            self.weight_peephole = nn.Parameter(
                torch.empty((2 if coupled else 3, hidden_size), **factory))
        self.reset_parameters()

    def __setstate__(self, state):
        super().__setstate__(state)
        # A peephole cell pickled whole before its steps took the native pass has the flag but
        # not _has_peephole: without it, that pass would run the step without its peepholes.
        self.__dict__.setdefault("_has_peephole", bool(state.get("peephole", False)))

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if "bias" in self.__dict__ and self.bias is not True:
            s += ", bias={bias}"
        if "nonlinearity" in self.__dict__ and self.nonlinearity != "tanh":
            s += ", nonlinearity={nonlinearity}"
        return s.format(**self.__dict__) + _variant_repr(self)

    def reset_parameters(self) -> None:
        """torch.nn's initialisation (_module_checks._reset_uniform)."""
        _reset_uniform(self)

    def _step(self, cell: str, input: Tensor, hx):
        """Validates like torch.nn, adds and removes the batch dimension of unbatched input, and
        runs one step. hx: None, a tensor, or for LSTM a pair."""
        if _fx_leaf.STATE._is_fx_tracing_flag:  # torch.fx.symbolic_trace
            traced = _fx_leaf.leaf_node(self, (input, hx))
            if traced is not None:  # one leaf node, as torch.nn's cells
                return traced
        fast = self._fast_step(cell, input, hx)
        if fast is not None:
            return fast
        return _checked_call(self._checked_step, cell, input, hx)

    def _script_cell_weights(self) -> list[Tensor]:
        """TorchScript: the cell's weights in torch.nn's order (_script.cell_step)."""
        weights = [self.weight_ih, self.weight_hh]
        b_ih, b_hh = self.bias_ih, self.bias_hh
        # A lone bias (the other set to None) is torch.nn's cell ops' "no term" for the missing
        # one, as eagerly (functional._with_zero_biases): it was dropped with its partner.
        if b_ih is not None and b_hh is not None:
            weights += [b_ih, b_hh]
        elif b_ih is not None:
            weights += [b_ih, torch.zeros_like(b_ih)]
        elif b_hh is not None:
            weights += [torch.zeros_like(b_hh), b_hh]
        return weights

    def _checked_step(self, cell: str, input: Tensor, hx):
        name = type(self).__name__
        is_lstm = cell in LSTM_CELLS
        # Each weight read once, in torch.nn's order: a parametrization with side effects then
        # runs as often as there (modules._read_as_torch_nn_does).
        weights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        peephole = self.weight_peephole if self._has_peephole else None
        for what, weight in (("weight_ih", weights[0]), ("weight_hh", weights[1])):
            if weight is None:  # (a bias may be None, as for torch.nn's cell ops)
                _refuse_missing_weight(self, what)
        if self._has_peephole and peephole is None:  # (it ran as the plain LSTM; review, s. 31)
            _refuse_missing_weight(self, "weight_peephole")
        input, hx = _follow_autocast(input, hx, weights[0])
        check.check_input_dim(name, input, (1, 2))
        states = None
        if hx is not None:
            states = check.split_lstm_state(hx, "hx", name) if is_lstm else (hx,)
            whats = ("hx[0]", "hx[1]") if is_lstm else ("hidden",)
            for state, what in zip(states, whats):
                check.check_cell_hidden_dim(name, state, what)
        batched = input.dim() == 2
        batch_input = input if batched else input.unsqueeze(0)
        # Every shape before any dtype or device, in torch.nn's order (its tests match the
        # message of the first problem found).
        check.check_cell_input_size(batch_input, self.input_size)
        whats = ("hidden0", "hidden1") if is_lstm else ("hidden0",)
        for state, what in zip(states or (), whats):
            check.check_cell_hidden(name, state, what, batch_input, self.hidden_size, batched)
        check.check_cell_dtypes_and_devices(name, batch_input, weights[0], states or (), whats)
        if states is not None:
            if not batched:
                states = tuple(s.unsqueeze(0) for s in states)
            hx = states if is_lstm else states[0]
        _check_parameters(self, cell, [(*weights, None, peephole)], [_CELL_WEIGHT_NAMES])
        if self._is_variant and _backend.recording_graph():
            result = self._variant_step(batch_input, hx, weights, peephole)
        else:
            result = functional.cell_step(cell, batch_input, *weights, hx, peephole)
        if batched:
            return result
        return tuple(r.squeeze(0) for r in result) if is_lstm else result.squeeze(0)


    def _fast_step(self, cell: str, input: Tensor, hx):
        """The common call (a batched input and states of the weights' dtype, shapes and device,
        a CPU step that _cell_step runs) straight to _cell_step, with only the checks that decide
        it: the full validation costs more than the step itself at small sizes (~25 us against
        torch.nn's whole ~14 us RNNCell call at B=1 H=64). None for anything else, which _step
        then validates and reports exactly as before."""
        params = self._parameters
        weight = params.get("weight_ih")
        # (applies() first: it also declines while a graph is recorded, before any comparison
        # of a traced size.)
        if (type(input) is not Tensor or not _cell_step.applies(input) or weight is None
                or input.dtype is not weight.dtype or input.size(1) != self.input_size
                or self.hidden_size == 0 or torch.is_autocast_enabled("cpu")):
            return None
        shape = (input.size(0), self.hidden_size)
        h = c = None
        if hx is not None:
            if cell in LSTM_CELLS:
                if type(hx) not in (tuple, list) or len(hx) != 2:
                    return None
                h, c = hx
                if not _is_state(c, shape, input.dtype, input.device):
                    return None
            else:
                h = hx
            if not _is_state(h, shape, input.dtype, input.device):
                return None
        w_hh, b_ih, b_hh = params.get("weight_hh"), params.get("bias_ih"), params.get("bias_hh")
        # (A peephole cell's own parameter only: a weight_peephole set on another cell is not
        # one of its weights, on this path or the checked one.)
        peephole = params.get("weight_peephole") if self._has_peephole else None
        # A bias that is not a plain parameter (a parametrization computes it, or a hook sets
        # it) reads None here: the full path reads it as an attribute, like every weight.
        if (w_hh is None or (peephole is None and self._has_peephole)
                or (self.bias and (b_ih is None or b_hh is None))
                or _cell_step.operand_problem(cell, input.dtype, shape[0], input.size(1), h, c,
                                              weight, w_hh, b_ih, b_hh,
                                              peephole=peephole) is not None):
            return None
        return _cell_step.step(cell, input, h, c, weight, w_hh, b_ih, b_hh,
                               peephole=peephole)


class LSTMCell(RNNCellBase):
    """Drop-in torch.nn.LSTMCell: (h', c') = cell(input, (h, c)). The keyword arguments peephole
    and coupled_input_forget give LSTM's variants (see LSTM), with the parameter
    `weight_peephole` [3 or 2, hidden_size]; a variant's step runs on the native cell step like
    the plain cell's, and as torch ops while a graph is recorded (_variant_step)."""

    peephole = coupled_input_forget = False  # as RNNBase's flags

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, peephole: bool = False, coupled_input_forget: bool = False):
        _check_variant_flags(peephole, coupled_input_forget)
        self.peephole = bool(peephole)
        self.coupled_input_forget = bool(coupled_input_forget)
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)

    def __prepare_scriptable__(self):
        _refuse_variant(self, "torch.jit.script")
        return self

    def _variant_step(self, x: Tensor, hx, weights: tuple, peephole: Optional[Tensor]):
        """A variant's step (x [B, I], hx None or (h, c) [B, H], weights and peephole checked)
        as torch ops while a graph is recorded: fusedrnn.reference.lstm_cell on the cell's own
        parameters, which torch.jit.trace records and both ONNX exporters write as ONNX ops (a
        recorded native step would be the recurrence's custom op, and ONNX has no peephole LSTM
        op here)."""
        if hx is None:
            zeros = x.new_zeros(x.size(0), self.hidden_size)
            hx = (zeros, zeros)
        return reference.lstm_cell(x, hx[0], hx[1], *weights, None, peephole,
                                   self.coupled_input_forget)

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None
                ) -> tuple[Tensor, Tensor]:
        if torch.jit.is_scripting():
            h: Optional[Tensor] = None
            c: Optional[Tensor] = None
            if hx is not None:
                h, c = hx[0], hx[1]
            return _script.cell_step("lstm", "LSTMCell", input, h, c, self._script_cell_weights(),
                                     self.input_size, self.hidden_size)
        return self._step("lstm_cifg" if self.coupled_input_forget else "lstm", input, hx)


class GRUCell(RNNCellBase):
    """Drop-in torch.nn.GRUCell: h' = cell(input, h)."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None):
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        if torch.jit.is_scripting():
            return _script.cell_step("gru", "GRUCell", input, hx, None, self._script_cell_weights(),
                                     self.input_size, self.hidden_size)[0]
        return self._step("gru", input, hx)


class RNNCell(RNNCellBase):
    """Drop-in torch.nn.RNNCell (tanh or relu): h' = cell(input, h)."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, num_chunks=1, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        if self.nonlinearity not in ("tanh", "relu"):
            # torch.nn accepts any nonlinearity at construction and fails at the call, with this
            # class, once it has checked the ranks of input and hx.
            _script.check_cell_ranks("RNNCell", input, hx, None, "hidden")
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity} "
                               "(RNNCell supports 'tanh' and 'relu')")
        if torch.jit.is_scripting():
            return _script.cell_step("rnn_" + self.nonlinearity, "RNNCell", input, hx, None,
                                     self._script_cell_weights(), self.input_size,
                                     self.hidden_size)[0]
        return self._step("rnn_" + self.nonlinearity, input, hx)
