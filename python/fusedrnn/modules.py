"""Drop-in replacements for torch.nn.LSTM, GRU and RNN, on the native kernels.

Constructor signatures, attributes, parameter names/order/shapes/initialisation, the forward
contract (batched and unbatched input, batch_first, optional hx, PackedSequence in and out with
torch.nn's sorted/unsorted index handling, result shapes) and the exception classes of bad input are
torch.nn's, so a module can replace its torch.nn twin and `load_state_dict` works both ways.
Beyond torch.nn, the forward takes `lengths=` (one length per sequence of a padded batch), with
the result of packing, running and padding again, and static shapes (README, "Variable lengths
without packing").
The math runs in `functional.rnn` (under torch.jit.script, in its TorchScript twin, _script.py);
this file only adapts torch.nn's calling conventions to it. The cells are cell_modules.py.
"""

from typing import Optional, overload

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import _backend, _cell_step, _fx_leaf, _inference, _onnx_export, _script
from . import _validation as check
from . import functional
from ._module_checks import (_check_parameters, _check_variant_flags, _checked_call,
                             _follow_autocast, _is_state, _refuse_missing_weight,
                             _refuse_variant, _reset_uniform, _variant_repr)
from ._packing import PackedLayout
# The cells lived here first: `fusedrnn.modules.LSTMCell` still names them, for imports and for
# whole modules pickled under that path.
from .cell_modules import GRUCell, LSTMCell, RNNCell, RNNCellBase  # noqa: F401

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_CELLS = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


class RNNBase(nn.Module):
    """What LSTM, GRU and RNN share: parameters, their layout, and the forward contract."""

    # torch.jit.script compiles every property it finds; these serve the eager path only.
    __jit_unused_properties__ = ["all_weights", "_flat_weights", "_cell", "_display_name",
                                 "_state_size", "_num_states"]
    # The LSTM variants' flags (__init__ sets them on the instance). Here too, so that a module
    # pickled whole by a fusedrnn without the variants still runs when loaded.
    _is_variant = _has_peephole = _coupled = False

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, device=None, dtype=None):
        super().__init__()
        if mode not in _GATES:
            raise ValueError(f"Unrecognized RNN mode: {mode}")
        num_layers, proj_size = check.check_rnn_arguments(
            mode, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            proj_size)
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

        factory = {"device": device, "dtype": dtype}
        # The LSTM variants (LSTM's keyword arguments): set on the instance before this runs.
        coupled = self.__dict__.get("coupled_input_forget", False)
        peephole = self.__dict__.get("peephole", False)
        self._is_variant = coupled or peephole
        self._has_peephole = peephole  # (plain attributes: the fast path reads them per call)
        self._coupled = coupled  # the kernels' cell is "lstm_cifg" (_cell)
        gate_size = (3 if coupled else _GATES[mode]) * hidden_size
        state_size = proj_size if proj_size > 0 else hidden_size
        num_directions = 2 if bidirectional else 1
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        # Registration order is torch.nn's, so that named_parameters(), state_dict() and the
        # initialisation below (which draws in parameters() order) match it exactly.
        for layer in range(num_layers):
            layer_input_size = input_size if layer == 0 else state_size * num_directions
            for direction in range(num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = [("weight_ih", (gate_size, layer_input_size)),
                          ("weight_hh", (gate_size, state_size))]
                if bias:
                    shapes += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                if proj_size > 0:
                    shapes += [("weight_hr", (proj_size, hidden_size))]
                if peephole:  # rows w_ci, w_cf, w_co; a CIFG has no input gate: w_cf, w_co
                    shapes += [("weight_peephole", (2 if coupled else 3, hidden_size))]
                names = []
                for name, shape in shapes:
                    setattr(self, name + suffix, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(name + suffix)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self._weight_names_by_layer()
        self.reset_parameters()

    # --- torch.nn.RNNBase's public surface ---------------------------------------------------------

    def reset_parameters(self) -> None:
        """torch.nn's initialisation (_module_checks._reset_uniform)."""
        _reset_uniform(self)

    def flatten_parameters(self) -> None:
        """No-op, kept for compatibility: the kernels read the parameters where they are."""

    # torch.nn.RNNBase's checking helpers. forward does not call them (it checks with
    # _validation's fuller messages), but they are public there, and a subclass that overrides
    # forward calls them: same results and errors as torch.nn's.

    def check_input(self, input: Tensor, batch_sizes: Optional[Tensor]) -> None:
        weight = self.weight_ih_l0
        if input.dtype != weight.dtype and not torch._C._is_any_autocast_enabled():
            raise check.input_dtype_error(input, weight)
        expected_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected "
                               f"{self.input_size}, got {input.size(-1)}")

    def get_expected_hidden_size(self, input: Tensor,
                                 batch_sizes: Optional[Tensor]) -> tuple[int, int, int]:
        if batch_sizes is not None:
            mini_batch = int(batch_sizes[0])
        else:
            mini_batch = input.size(0) if self.batch_first else input.size(1)
        return (self._num_states, mini_batch, self._state_size)

    def check_hidden_size(self, hx: Tensor, expected_hidden_size: tuple[int, int, int],
                          msg: str = "Expected hidden size {}, got {}") -> None:
        if hx.size() != expected_hidden_size:
            raise RuntimeError(msg.format(expected_hidden_size, list(hx.size())))

    def check_forward_args(self, input: Tensor, hidden, batch_sizes: Optional[Tensor]) -> None:
        self.check_input(input, batch_sizes)
        expected_hidden_size = self.get_expected_hidden_size(input, batch_sizes)
        if self.mode != "LSTM":
            self.check_hidden_size(hidden, expected_hidden_size)
            return
        self.check_hidden_size(hidden[0], expected_hidden_size,
                               "Expected hidden[0] size {}, got {}")
        self.check_hidden_size(hidden[1], self.get_expected_cell_size(input, batch_sizes),
                               "Expected hidden[1] size {}, got {}")

    def permute_hidden(self, hx, permutation: Optional[Tensor]):
        """hx (for an LSTM the pair (h, c)) with its batch dimension in `permutation`'s order."""
        if permutation is None:
            return hx
        if self.mode == "LSTM":
            return hx[0].index_select(1, permutation), hx[1].index_select(1, permutation)
        return hx.index_select(1, permutation)

    def _apply(self, fn, recurse=True):
        # The inference caches refer to the parameters weakly, and torch.utils.swap_tensors
        # (.to()/.double() under torch.__future__.set_swap_module_params_on_conversion) refuses
        # a tensor with weak references; torch.nn drops its _flat_weight_refs here likewise.
        _inference.forget(self)
        return super()._apply(fn, recurse)

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    @property
    def _flat_weights(self) -> list[nn.Parameter]:
        return [getattr(self, name) for name in self._flat_weights_names]

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        return s.format(**self.__dict__) + _variant_repr(self)

    def __setstate__(self, state):
        super().__setstate__(state)
        # A CIFG pickled whole before its kernels took three gates (which ran it as the plain
        # LSTM that computes it) has its flag but not _coupled: without it, its 3-gate weights
        # would meet the plain LSTM's kernels.
        self.__dict__.setdefault("_coupled", bool(state.get("coupled_input_forget", False)))

    # --- forward -------------------------------------------------------------------------------------

    @property
    def _cell(self) -> str:
        """The cell of functional.rnn and the kernels."""
        return "lstm_cifg" if self._coupled else _CELLS[self.mode]

    @property
    def _display_name(self) -> str:
        return "RNN" if self.mode.startswith("RNN") else self.mode

    def _layer_weights(self) -> list:
        """(w_ih, w_hh, b_ih, b_hh, w_hr) per layer and direction, for functional.rnn, and a
        peephole LSTM's peephole weights as a sixth entry; read at every call, so .to(),
        load_state_dict and torch.func.functional_call are always seen."""
        names = self._weight_names_by_layer()
        if _is_parametrized(self):
            read = iter(_read_as_torch_nn_does(
                self, [name for layer in names for name in layer if name is not None]))
            weights = [tuple(next(read) if name is not None else None for name in layer)
                       for layer in names]
        else:
            weights = [tuple(getattr(self, name) if name is not None else None for name in layer)
                       for layer in names]
        for layer, layer_names in zip(weights, names):
            for name, weight in zip(layer_names, layer):
                if name is not None and weight is None:
                    _refuse_missing_weight(self, name)
        _check_parameters(self, self._cell, weights, names)
        return weights

    def _weight_names_by_layer(self) -> list:
        """_layer_weights' names per layer and direction, None for absent ones. __init__ builds
        them: built at a first call inside a compiled torch.utils.checkpoint, the attribute
        write is a side effect that fullgraph refuses. (Here lazily for a module pickled
        before.)"""
        names = self.__dict__.get("_layer_weight_names")
        if names is None:
            num_directions = 2 if self.bidirectional else 1
            present = {"weight_ih": True, "weight_hh": True, "bias_ih": self.bias,
                       "bias_hh": self.bias, "weight_hr": self.proj_size > 0}
            if self.__dict__.get("peephole"):
                present["weight_peephole"] = True
            names = [tuple(f"{name}_l{layer}{'_reverse' if direction else ''}" if there else None
                           for name, there in present.items())
                     for layer in range(self.num_layers) for direction in range(num_directions)]
            self.__dict__["_layer_weight_names"] = names
        return names

    def _fast_forward(self, input, hx):
        """The common inference call (no gradient, a batched tensor of a dtype the inference plan
        takes (_inference.PLAN_DTYPES: float32/float64, and bfloat16 on the CPU), valid or no
        state, no autocast, no dropout to apply) straight to the module's inference plan
        (_inference.py), with only the checks that decide it; with a gradient, the same for a
        call of one time step (a decoder or a stream trained a step per call), which the cell
        steps run under autograd exactly as the full path would, without its ~20 us of
        per-call bookkeeping. None for anything else, which the full path then handles (and
        reports, for bad input) exactly as before. A call with gradients enabled where nothing
        requires one (a frozen module called without no_grad) is an inference call."""
        grad = torch.is_grad_enabled() and self._may_record_graph(input, hx)
        if (type(input) is not Tensor or input.is_meta or not _backend.plain_eager()
                or _is_parametrized(self)  # (the full path reads them as torch.nn does)
                or input.dim() != 3
                or (grad and input.size(1 if self.batch_first else 0) != 1)
                or (self.training and self.dropout > 0 and self.num_layers > 1)):
            return None
        # Straight from the parameter table (nn.Module.__getattr__ costs ~0.5 us); a weight that
        # is not a plain parameter (torch.nn.utils parametrizations) takes the full path.
        weight = self._parameters.get("weight_ih_l0")
        dtype, device = input.dtype, input.device
        if (weight is None or dtype is not weight.dtype
                or dtype not in _inference.PLAN_DTYPES.get(device.type, ())
                or device != weight.device
                or input.size(2) != self.input_size
                or torch.is_autocast_enabled(device.type)):
            return None
        x = input.transpose(0, 1) if self.batch_first else input
        seq_len, batch, _ = x.shape
        if seq_len == 0 or batch == 0:
            return None
        is_lstm = self.mode == "LSTM"
        num_states = self.num_layers * (2 if self.bidirectional else 1)
        h0 = c0 = None
        if hx is not None:
            if is_lstm:
                if type(hx) not in (tuple, list) or len(hx) != 2:
                    return None
                h0, c0 = hx
                if not _is_state(c0, (num_states, batch, self.hidden_size), dtype, device):
                    return None
            else:
                h0 = hx
            if not _is_state(h0, (num_states, batch, self._state_size), dtype, device):
                return None
        weights = self._one_step_weights(x, h0, c0) if seq_len == 1 else None
        if weights is not None:
            result = self._one_step(x, h0, c0, weights)
        elif grad:  # the inference plan has no backward
            return None
        else:
            result = _inference.forward(self, self._cell, self.num_layers,
                                        2 if self.bidirectional else 1, x, h0, c0)
        output, h_n, c_n = result
        if self.batch_first:
            output = output.transpose(0, 1)
        return (output, (h_n, c_n)) if is_lstm else (output, h_n)

    def _may_record_graph(self, input, hx) -> bool:
        """False when neither the input, nor the states, nor a weight requires grad: then
        torch.nn's result has no autograd graph either. (Parametrized weights live in
        submodules, which a plain module has none of: with any, assume a graph.)"""
        if self._modules or not isinstance(input, Tensor) or input.requires_grad:
            return True
        if hx is not None:
            states = hx if isinstance(hx, (tuple, list)) else (hx,)
            if any(not isinstance(s, Tensor) or s.requires_grad for s in states):
                return True
        params = self._parameters
        if any(p is not None and p.requires_grad for p in params.values()):
            return True
        # A weight that is no longer a parameter but a plain attribute (deleted, then set by a
        # hook, e.g. base + A @ B for a low-rank adapter) is read like one: its graph counts.
        return any(isinstance(w, Tensor) and w.requires_grad
                   for w in (getattr(self, name, None) for name in self._flat_weights_names
                             if name not in params))

    def _one_step_weights(self, x: Tensor, h0: Optional[Tensor], c0: Optional[Tensor]):
        """The layer weights when a call of one step runs as cell steps, else None:
        every operand fits a cell step (else the full path reports it as torch.nn does).
        Cell steps win at every size measured, also at B <= 2 with weights too large for the
        cell step's own products, where torch's GEMMs form them (B=1, us a call, against the
        recurrence reading W_hh in place: GRU H=256 73 against 85, LSTM H=512 338 against 361;
        GRU H=256 B=2 34 against 80)."""
        if not _cell_step.applies(x, dims=3):
            return None
        cell, num_dirs = self._cell, 2 if self.bidirectional else 1
        # The module's own parameters, checked once (the caller checked x and the states).
        checked = _inference.one_step_weights(self)
        if checked is not None:
            return checked
        weights = self._layer_weights()
        if _cell_step.stack_problem(cell, x, weights, h0, c0, self.num_layers, num_dirs):
            return None
        return weights

    def _one_step(self, x: Tensor, h0: Optional[Tensor], c0: Optional[Tensor], weights):
        """A sequence of one step (a stream or a decoder fed one step per call, with or without
        autograd): every layer and direction is a cell step (_cell_step.stack), straight from
        the parameters. At T=1 the recurrence would pack W_hh for a single use, and the inference
        plan's bookkeeping costs more than it saves (RNN B=1 H=256: ~50 against ~35 us a call
        this way).
        weights: _one_step_weights'. Returns (output [1, B, D*P], h_n, c_n or None)."""
        return _cell_step.stack(self._cell, x, weights, h0, c0, self.num_layers,
                                2 if self.bidirectional else 1)

    def _eager_forward(self, input, hx, lengths=None):
        if _fx_leaf.STATE._is_fx_tracing_flag:  # torch.fx.symbolic_trace
            traced = _fx_leaf.leaf_node(self, (input, hx),
                                        None if lengths is None else {"lengths": lengths})
            if traced is not None:  # one leaf node, as torch.nn's modules
                return traced
        if lengths is None:
            fast = self._fast_forward(input, hx)
            if fast is not None:
                return fast
        return _checked_call(self._checked_forward, input, hx, lengths)

    def _checked_forward(self, input, hx, lengths=None):
        """Every other call: validated like torch.nn, packed sequences, per-sequence lengths,
        autocast, dropout."""
        is_lstm = self.mode == "LSTM"
        layer_weights = self._layer_weights()  # each weight read once, before anything random
        weight = layer_weights[0][0]
        input, hx = _follow_autocast(input, hx, weight)
        packed = isinstance(input, PackedSequence)
        if lengths is not None:
            check.check_lengths_input(self._display_name, input)
            if (_backend.recording_graph() and _onnx_export.active()
                    and not torch.compiler.is_compiling()):  # (the dynamo exporter: the node)
                return self._exported_forward_with_lengths(input, hx, lengths, layer_weights)
        if packed and _backend.recording_graph() and _onnx_export.active():
            if self._has_peephole:
                _onnx_export.refuse_packed_peephole()
            return self._exported_packed_forward(input, hx, layer_weights)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            states = self._state_tuple(hx, None) if hx is not None else None
            check.check_input(data, weight, self.input_size, expected_dim=2)
            layout = PackedLayout(batch_sizes, data.device)
            if not _backend.recording_graph():  # (reads batch_sizes' values)
                check.check_packed_sequence(self._display_name, data, layout.batch_sizes,
                                            layout.rows.numel())
            x, batch_first, batched, lengths = layout.pad(data), False, True, layout.lengths
        else:
            check.check_input_dim(self._display_name, input, (2, 3))
            batched = input.dim() == 3
            # torch.nn's order: the states' rank, then the input's dtype and size, then the
            # states' shapes (its tests match the message of the first problem found).
            states = self._state_tuple(hx, batched) if hx is not None else None
            batch_first = self.batch_first
            x = input if batched else input.unsqueeze(0 if batch_first else 1)
            check.check_input(x, weight, self.input_size, expected_dim=3)
        batch = x.size(0) if batch_first else x.size(1)
        if hx is not None:
            hx = self._checked_hx(states, x, batch, sorted_indices if packed else None)
        check.check_sequence_length(x.size(1) if batch_first else x.size(0))

        dropout_fn = layout.dropout(self.dropout) if packed else None
        output, h_n, c_n = functional.rnn(
            self._cell, x, layer_weights, hx, num_layers=self.num_layers,
            bidirectional=self.bidirectional, batch_first=batch_first, lengths=lengths,
            dropout=self.dropout, training=self.training, dropout_fn=dropout_fn)

        if packed:
            output = PackedSequence(layout.pack(output), batch_sizes, sorted_indices,
                                    unsorted_indices)
            h_n, c_n = _in_caller_order(h_n, c_n, unsorted_indices)
        elif not batched:
            output = output.squeeze(0 if batch_first else 1)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        return (output, (h_n, c_n)) if is_lstm else (output, h_n)

    def _exported_packed_forward(self, input: PackedSequence, hx, layer_weights: list):
        """torch.onnx.export of a packed input: the packed RNN op torch.nn calls, which the
        TorchScript-based exporter translates (_onnx_export.py). layer_weights: _layer_weights'."""
        data, batch_sizes, sorted_indices, unsorted_indices = input
        check.check_input(data, layer_weights[0][0], self.input_size, expected_dim=2)
        if hx is not None:
            hx = self._checked_hx(self._state_tuple(hx, None), data, int(batch_sizes[0]),
                                  sorted_indices)
        # The weights in torch's order (a CIFG's as the plain LSTM's that computes it).
        cell, layer_weights = _onnx_export.as_exported(self._cell, layer_weights)
        flat = [w for layer in layer_weights for w in layer[:5] if w is not None]
        output, h_n, c_n = _onnx_export.packed_rnn(
            cell, data, batch_sizes, hx, flat, self.bias, self.num_layers,
            self.dropout, self.training, self.bidirectional, self._state_size, self.hidden_size)
        h_n, c_n = _in_caller_order(h_n, c_n, unsorted_indices)
        output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
        return (output, (h_n, c_n)) if self.mode == "LSTM" else (output, h_n)

    def _exported_forward_with_lengths(self, input: Tensor, hx, lengths, layer_weights: list):
        """The TorchScript-based ONNX exporter, a padded input with lengths: packed, run as a
        PackedSequence (torch's packed RNN op, which that exporter writes as ONNX's node with its
        sequence_lens), and padded again to the input's length, zeros past each end, as the
        kernels write them. (The dynamo exporter writes the node itself: _onnx_export.layer.)"""
        if self._has_peephole:
            _onnx_export.refuse_packed_peephole()
        total_length = input.size(1 if self.batch_first else 0)
        lengths = torch.as_tensor(lengths).to("cpu", torch.int64)
        packed = pack_padded_sequence(input, lengths, batch_first=self.batch_first,
                                      enforce_sorted=False)
        output, state = self._exported_packed_forward(packed, hx, layer_weights)
        output, _ = pad_packed_sequence(output, batch_first=self.batch_first,
                                        total_length=total_length)
        return output, state

    def _state_tuple(self, hx, batched: Optional[bool]) -> tuple:
        """hx as a tuple of its states (an LSTM's pair, else one), each given a batch dimension
        when the input has none, after torch.nn's rank check (batched: whether the input is;
        None for a packed input, whose states are always 3-D and checked by shape alone)."""
        is_lstm = self.mode == "LSTM"
        states = check.split_lstm_state(hx, "hx", self._display_name) if is_lstm else (hx,)
        if batched is not None:
            check.check_hidden_dims(states, ("h_0", "c_0") if is_lstm else ("hx",), batched)
            if not batched:
                states = tuple(state.unsqueeze(1) for state in states)
        return states

    def _checked_hx(self, states: tuple, x: Tensor, batch: int,
                    sorted_indices: Optional[Tensor]):
        """The initial state(s) (_state_tuple's), their shapes, devices and dtypes validated like
        torch.nn, and put in the packed data's batch order."""
        is_lstm = self.mode == "LSTM"
        names = ("h_0", "c_0") if is_lstm else ("hx",)
        sizes = (self._state_size, self.hidden_size) if is_lstm else (self._state_size,)
        for state, name, size in zip(states, names, sizes):
            check.check_hidden_shape(state, (self._num_states, batch, size), name)
        prepared = []
        for state, name in zip(states, names):
            check.check_hidden_placement(state, x, name)
            if sorted_indices is not None:
                # The caller's states are in the caller's batch order; the packed data is not.
                state = state.index_select(1, sorted_indices)
            prepared.append(state)
        return tuple(prepared) if is_lstm else prepared[0]

    # --- TorchScript (_script.py): what torch.jit.script compiles instead of the eager path ------

    def __prepare_scriptable__(self):
        """torch.jit.script calls this first. A script cannot look parameters up by name, so the
        module hands it the flat weight list (torch.nn keeps one as an attribute, too). The list
        holds the parameters themselves: in-place updates, load_state_dict and .to() (which
        keeps the Parameter objects) stay visible to the script."""
        _refuse_variant(self, "torch.jit.script")
        self.__dict__["_script_weights"] = self._flat_weights
        return self

    def _script_states(self, h0: Optional[Tensor], c0: Optional[Tensor], x: Tensor,
                       batched: bool, lstm: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """TorchScript: the initial states (their rank checked already,
        _script.check_module_state_dims) checked against the time-major input x [T, B, I], all
        shapes first, and given a batch dimension when the input has none."""
        num_states = self.num_layers * (2 if self.bidirectional else 1)
        state_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        h_name = "h_0" if lstm else "hx"
        h0 = _script.module_state(h0, [num_states, x.size(1), state_size], batched, h_name,
                                  "hidden[0]" if lstm else "hidden")
        c0 = _script.module_state(c0, [num_states, x.size(1), self.hidden_size], batched, "c_0",
                                  "hidden[1]")
        # Every shape before any dtype, as torch.nn (and _checked_hx) check them.
        if h0 is not None:
            _script.check_state_dtype_and_device(h0, x, h_name)
        if c0 is not None:
            _script.check_state_dtype_and_device(c0, x, "c_0")
        return h0, c0

    def _script_forward(self, input: Tensor, h0: Optional[Tensor], c0: Optional[Tensor],
                        lengths: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """TorchScript, a tensor input: (output, h_n, c_n or an empty tensor), as
        _checked_forward returns them."""
        if input.dim() != 2 and input.dim() != 3:
            name = "RNN" if self.mode.startswith("RNN") else self.mode
            noun = " tensor" if name == "RNN" else ""  # torch.nn's text, as in _validation
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D{noun} "
                             "instead")
        batched = input.dim() == 3
        if lengths is not None and not batched:
            _script.refuse_unbatched_lengths(input, self.mode)
        # torch.nn's order, as the eager path's (_checked_forward).
        _script.check_module_state_dims(h0, c0, batched)
        x = input if batched else input.unsqueeze(0 if self.batch_first else 1)
        weights = self._script_weights
        _script.check_input(x, weights[0], self.input_size, 3)
        x = x.transpose(0, 1) if self.batch_first else x
        lstm = self.mode == "LSTM"
        h0, c0 = self._script_states(h0, c0, x, batched, lstm)
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN, got an "
                               "input with 0 time steps")
        if lengths is not None:
            lengths = _script.checked_lengths(lengths, x)
        output, h_n, c_n = _script.rnn(
            self.mode.lower(), x, h0, c0, weights, self.num_layers,
            2 if self.bidirectional else 1, self.bias, self.proj_size > 0, self.dropout,
            self.training, lengths)
        output = output.transpose(0, 1) if self.batch_first else output
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if lstm else c_n
        return output, h_n, c_n

    def _script_packed_forward(self, input: PackedSequence, h0: Optional[Tensor],
                               c0: Optional[Tensor]) -> tuple[PackedSequence, Tensor, Tensor]:
        """TorchScript, a PackedSequence: the states are in the caller's batch order, the packed
        data in sorted order (as _checked_forward handles them)."""
        data, batch_sizes = input.data, input.batch_sizes
        sorted_indices, unsorted_indices = input.sorted_indices, input.unsorted_indices
        weights = self._script_weights
        _script.check_input(data, weights[0], self.input_size, 2)
        if batch_sizes.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN, got an "
                               "input with 0 time steps")
        lstm = self.mode == "LSTM"
        dummy = data.new_empty(1, int(batch_sizes[0]), 1)  # [T, B, .]: the batch to check
        # (No rank check first: torch.nn reports a packed input's 2-D state by its shape.)
        h0, c0 = self._script_states(h0, c0, dummy, True, lstm)
        if sorted_indices is not None:
            h0 = h0.index_select(1, sorted_indices) if h0 is not None else None
            c0 = c0.index_select(1, sorted_indices) if c0 is not None else None
        out_data, h_n, c_n = _script.packed_rnn(
            self.mode.lower(), data, batch_sizes, h0, c0, weights, self.num_layers,
            2 if self.bidirectional else 1, self.bias, self.proj_size > 0, self.dropout,
            self.training)
        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices)
            c_n = c_n.index_select(1, unsorted_indices) if lstm else c_n
        return PackedSequence(out_data, batch_sizes, sorted_indices, unsorted_indices), h_n, c_n

    @property
    def _state_size(self) -> int:
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    @property
    def _num_states(self) -> int:
        return self.num_layers * (2 if self.bidirectional else 1)


class LSTM(RNNBase):
    """Drop-in torch.nn.LSTM (same arguments, parameters and results) on fusedrnn's kernels.

    Beyond torch.nn, two variants of the literature, each a keyword argument (both may be set):
    - peephole=True: peephole connections (Gers, Schraudolph & Schmidhuber, 2002). The input and
      forget gates also see c_{t-1}, the output gate sees c_t, through one weight per unit and
      gate: i = s(... + w_ci c_{t-1}), f = s(... + w_cf c_{t-1}), o = s(... + w_co c_t). Adds
      `weight_peephole_l{k}` [3, hidden_size] (rows w_ci, w_cf, w_co) per layer and direction.
    - coupled_input_forget=True: the coupled input and forget gate (CIFG; Greff et al., 2017):
      no input gate of its own, i = 1 - f. weight_ih/weight_hh/biases hold the gates f, g, o
      ([3 * hidden_size, .]), and weight_peephole the rows w_cf, w_co. Its kernels do the three
      gates' work (the cell "lstm_cifg" of functional.rnn and the custom ops).
    Both run on the native kernels (CPU and CUDA, training and inference, packed sequences,
    torch.compile). torch.jit.script refuses them; torch.onnx.export writes a CIFG as the plain
    LSTM that computes it (_onnx_export.as_exported) and, with dynamo=False, a peephole layer as
    ONNX's LSTM node with peepholes (_onnx_export.peephole_layer).
    """

    peephole = coupled_input_forget = False  # as RNNBase's flags

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *, peephole: bool = False,
                 coupled_input_forget: bool = False):
        _check_variant_flags(peephole, coupled_input_forget)
        self.peephole = bool(peephole)
        self.coupled_input_forget = bool(coupled_input_forget)
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype)

    def get_expected_cell_size(self, input: Tensor,
                               batch_sizes: Optional[Tensor]) -> tuple[int, int, int]:
        """torch.nn.LSTM's: the shape c_0 must have (RNNBase.check_forward_args)."""
        expected = self.get_expected_hidden_size(input, batch_sizes)
        return (expected[0], expected[1], self.hidden_size)

    @overload
    @torch._jit_internal._overload_method  # torch.nn.LSTM's two signatures, for TorchScript
    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None,
                lengths: Optional[Tensor] = None) -> tuple[Tensor, tuple[Tensor, Tensor]]: ...

    @overload
    @torch._jit_internal._overload_method
    def forward(self, input: PackedSequence, hx: Optional[tuple[Tensor, Tensor]] = None,
                lengths: Optional[Tensor] = None
                ) -> tuple[PackedSequence, tuple[Tensor, Tensor]]: ...

    def forward(self, input, hx=None, lengths=None):
        if torch.jit.is_scripting():
            h0: Optional[Tensor] = None
            c0: Optional[Tensor] = None
            if hx is not None:
                h0, c0 = hx[0], hx[1]
            if isinstance(input, PackedSequence):
                _script.check_no_lengths(lengths, self.mode)
                packed, h_n, c_n = self._script_packed_forward(input, h0, c0)
                return packed, (h_n, c_n)
            output, h_n, c_n = self._script_forward(input, h0, c0, lengths)
            return output, (h_n, c_n)
        return self._eager_forward(input, hx, lengths)


class GRU(RNNBase):
    """Drop-in torch.nn.GRU (same arguments, parameters and results) on fusedrnn's kernels."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 _proj_size_slot: int = 0, device=None, dtype=None, **kwargs):
        _reject_proj_size(kwargs, _proj_size_slot)
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype)

    # torch.nn's two signatures, for TorchScript. It looks overloads up by the class that declares
    # them, so GRU and RNN each carry this block (as torch.nn's do).
    @overload
    @torch._jit_internal._overload_method
    def forward(self, input: Tensor, hx: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> tuple[Tensor, Tensor]: ...

    @overload
    @torch._jit_internal._overload_method
    def forward(self, input: PackedSequence, hx: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> tuple[PackedSequence, Tensor]: ...

    def forward(self, input, hx=None, lengths=None):
        if torch.jit.is_scripting():
            if isinstance(input, PackedSequence):
                _script.check_no_lengths(lengths, self.mode)
                packed, h_n, _ = self._script_packed_forward(input, hx, None)
                return packed, h_n
            output, h_n, _ = self._script_forward(input, hx, None, lengths)
            return output, h_n
        return self._eager_forward(input, hx, lengths)


class RNN(RNNBase):
    """Drop-in torch.nn.RNN (Elman, tanh or relu) on fusedrnn's kernels."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, _proj_size_slot: int = 0,
                 device=None, dtype=None, **kwargs):
        _reject_proj_size(kwargs, _proj_size_slot)
        self.nonlinearity = nonlinearity
        check.check_nonlinearity(nonlinearity)
        mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype)

    # torch.nn's two signatures, for TorchScript. It looks overloads up by the class that declares
    # them, so GRU and RNN each carry this block (as torch.nn's do).
    @overload
    @torch._jit_internal._overload_method
    def forward(self, input: Tensor, hx: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> tuple[Tensor, Tensor]: ...

    @overload
    @torch._jit_internal._overload_method
    def forward(self, input: PackedSequence, hx: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> tuple[PackedSequence, Tensor]: ...

    def forward(self, input, hx=None, lengths=None):
        if torch.jit.is_scripting():
            if isinstance(input, PackedSequence):
                _script.check_no_lengths(lengths, self.mode)
                packed, h_n, _ = self._script_packed_forward(input, hx, None)
                return packed, h_n
            output, h_n, _ = self._script_forward(input, hx, None, lengths)
            return output, h_n
        return self._eager_forward(input, hx, lengths)


def _in_caller_order(h_n: Tensor, c_n: Optional[Tensor], unsorted_indices: Optional[Tensor]):
    """Final states of a packed run, from the packed (sorted) batch order back to the caller's,
    as torch.nn returns them."""
    if unsorted_indices is None:
        return h_n, c_n
    return (h_n.index_select(1, unsorted_indices),
            c_n.index_select(1, unsorted_indices) if c_n is not None else None)


def _is_parametrized(module: nn.Module) -> bool:
    """Whether torch.nn.utils.parametrize computes any of the module's tensors (it registers the
    `parametrizations` ModuleDict); a dict lookup, cheaper than parametrize.is_parametrized."""
    return "parametrizations" in module._modules


def _read_as_torch_nn_does(module: nn.Module, names: list) -> list:
    """The weights `names` (torch.nn's _flat_weights_names order) of a parametrized module, read
    the way torch.nn's RNN modules read theirs at each call, and so evaluating each
    parametrization as many times, in the same order.

    A parametrization can have side effects: a weight dropout (DropConnect, AWD-LSTM's
    WeightDrop) draws from the global generator, spectral_norm advances its power iteration in
    training mode. The same seed gives the same masks, and the same power-iteration state, only
    if each is evaluated as often as torch.nn does. torch.nn's _update_flat_weights takes
    hasattr and getattr of each weight until one is not the tensor it kept from its last read
    (a parametrized weight is a new tensor at every read), then hasattr and getattr of every
    weight, and uses those. A weight counts as unchanged here when it is the module's own
    registered parameter, where torch.nn compares it with a weak reference to what it read last:
    the two differ only for a parametrization that returns an existing tensor."""
    unchanged = []
    for name in names:
        weight = getattr(module, name) if hasattr(module, name) else None
        if weight is not None and weight is not module._parameters.get(name):
            return [getattr(module, name) if hasattr(module, name) else None for name in names]
        unchanged.append(weight)
    return unchanged


def _reject_proj_size(kwargs: dict, positional: int) -> None:
    """GRU's and RNN's arguments take torch.nn's positional order, which is RNNBase's: a
    proj_size slot sits between bidirectional and device, so GRU(2, 3, 1, True, False, 0.0,
    False, 0, "cpu") puts "cpu" in device here too. Only a zero fits there (torch.nn builds a
    module that cannot run from any other); proj_size by keyword is refused, as torch.nn does."""
    if "proj_size" in kwargs or positional != 0:
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
    if kwargs:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(kwargs))}")
