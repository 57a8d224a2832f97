"""Swapping torch.nn's recurrent modules for fusedrnn's inside a model, and back.

`torch.nn.LSTM` -> `fusedrnn.LSTM` is one import where you write the model. Where you do not (a
model class from a library, a model object loaded whole), `from_torch_nn(model)` puts the
fusedrnn twin in place of every torch.nn LSTM, GRU, RNN, LSTMCell, GRUCell and RNNCell in it;
`to_torch_nn(model)` puts torch.nn's back (then torch.nn's own tools apply: dynamic
quantization, code that asks `isinstance(m, nn.LSTM)`, a process without fusedrnn).

The twin takes over the module's Parameter objects themselves (nothing is copied): an optimizer
built before the swap goes on training the model, and the state dict is unchanged. It also
takes over the training flag, the attributes set on the module after it was built, and its
hooks (the hook dictionaries themselves, so that a handle taken before still removes its hook).
Only modules of exactly these classes are swapped: a subclass may have changed forward, so it is
left as it is. Refused, naming the module's path in the model, where the twin could not do what
the module did: parameters that are not the plain ones (parametrized, weight_norm, pruned),
buffers or submodules registered on it, and a model already compiled (an OptimizedModule, or
`module.compile()`), which would go on running the modules it compiled.
"""
from __future__ import annotations

import sys
from typing import Dict, Type

import torch
from torch import nn

from . import cell_modules, modules

_TORCH_TO_FUSED: Dict[Type[nn.Module], Type[nn.Module]] = {
    nn.LSTM: modules.LSTM, nn.GRU: modules.GRU, nn.RNN: modules.RNN,
    nn.LSTMCell: cell_modules.LSTMCell, nn.GRUCell: cell_modules.GRUCell,
    nn.RNNCell: cell_modules.RNNCell,
}
_FUSED_TO_TORCH = {fused: torch_class for torch_class, fused in _TORCH_TO_FUSED.items()}

# Constructor arguments, read back from the module's attributes of the same names (both
# libraries keep them so).
_SEQUENCE_ARGUMENTS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first",
                       "dropout", "bidirectional")
_CELL_ARGUMENTS = ("input_size", "hidden_size", "bias")

# Module's own hook dictionaries, and the flag that says whether its backward hooks are full ones.
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_HOOK_FLAGS = ("_is_full_backward_hook",)


def from_torch_nn(module: nn.Module) -> nn.Module:
    """`module` with each torch.nn LSTM/GRU/RNN and cell in it replaced by fusedrnn's twin
    (in place; the twin itself when `module` is one of them). Returns the module to use."""
    return _swap(module, _TORCH_TO_FUSED, {}, "")


def to_torch_nn(module: nn.Module) -> nn.Module:
    """`module` with each fusedrnn LSTM/GRU/RNN and cell in it replaced by torch.nn's (in place;
    torch.nn's itself when `module` is one of them). Returns the module to use. The LSTM
    variants (peephole, coupled_input_forget) have no torch.nn twin and are refused."""
    return _swap(module, _FUSED_TO_TORCH, {}, "")


def _swap(module: nn.Module, twins: dict, done: Dict[int, nn.Module], path: str) -> nn.Module:
    """module, or its twin; `done` maps a swapped module's id to its twin, so that a module held
    in two places gets one twin; `path` is the module's name in the model, for errors."""
    if id(module) in done:
        return done[id(module)]
    if _is_compiled(module) and any(_kind(m) in twins for m in module.modules()):
        raise ValueError(f"fusedrnn: cannot swap inside {path or 'the module'}: it is compiled "
                         f"(torch.compile or module.compile()), and would go on running the "
                         f"modules it compiled; swap before compiling")
    kind = _kind(module)
    if kind in twins:
        where = f"{path or 'the module'} ({kind.__module__}.{kind.__qualname__})"
        swapped = _twin(module, twins[kind], where)
    else:
        swapped = module
    done[id(module)] = swapped
    for name, child in list(swapped.named_children()):
        twin = _swap(child, twins, done, f"{path}.{name}" if path else name)
        if twin is not child:
            setattr(swapped, name, twin)
    return swapped


def _kind(module: nn.Module) -> type:
    """The module's class, as it was before torch.nn.utils.parametrize made it a subclass."""
    if torch.nn.utils.parametrize.is_parametrized(module):
        return type(module).__bases__[0]
    return type(module)


def _is_compiled(module: nn.Module) -> bool:
    """torch.compile's wrapper (OptimizedModule), or a module compiled in place."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # (not imported: nothing compiled)
    wrapper = eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)
    return wrapper or getattr(module, "_compiled_call_impl", None) is not None


def _twin(old: nn.Module, cls: Type[nn.Module], where: str) -> nn.Module:
    if torch.nn.utils.parametrize.is_parametrized(old):
        raise ValueError(f"fusedrnn: cannot swap {where}: it is parametrized; swap it before "
                         f"registering the parametrizations")
    if getattr(old, "_is_variant", False):
        raise ValueError(f"fusedrnn: cannot swap {where}: torch.nn has no peephole or coupled "
                         f"input-forget LSTM to be its twin")
    held = [f"buffer {name}" for name, _ in old.named_buffers(recurse=False)]
    held += [f"submodule {name}" for name, _ in old.named_children()]
    if held:
        raise ValueError(f"fusedrnn: cannot swap {where}: its twin would lose its "
                         f"{', '.join(held)}")
    parameters = dict(old.named_parameters(recurse=False))
    first = next(iter(parameters.values()), None)
    arguments = _constructor_arguments(old)
    dtype = first.dtype if first is not None else None
    new = cls(**arguments, device="meta", dtype=dtype)
    expected = {name for name, _ in new.named_parameters(recurse=False)}
    if set(parameters) != expected:
        raise ValueError(
            f"fusedrnn: cannot swap {where}: its parameters "
            f"{sorted(set(parameters) ^ expected)} are not the plain ones (weight_norm or "
            f"pruning registered on it?); swap it before those")
    for name, parameter in parameters.items():
        setattr(new, name, parameter)  # the Parameter object itself: optimizers keep it
    if hasattr(new, "flatten_parameters"):  # torch.nn's: its flat weight list, cuDNN's buffer
        new.flatten_parameters()
    # What was set on the module after it was built (a qconfig, a tag), not what its class sets.
    built = type(old)(**arguments, device="meta", dtype=dtype).__dict__
    for name, value in old.__dict__.items():
        if name not in built:
            setattr(new, name, value)
    for name in _HOOK_DICTS:  # the dictionaries themselves: handles taken before still work
        if name in old.__dict__:
            new.__dict__[name] = old.__dict__[name]
    for flag in _HOOK_FLAGS:
        if flag in old.__dict__:
            setattr(new, flag, getattr(old, flag))
    new.train(old.training)
    _release(old)
    return new


def _release(old: nn.Module) -> None:
    """Drops the weak references the swapped-out module holds to the parameters it gave away
    (torch.nn's _flat_weight_refs, fusedrnn's inference caches): .to() under
    torch.__future__.set_swap_module_params_on_conversion refuses a tensor with weak references,
    and the old module may live on (a variable still holds it). It stays callable, on the
    parameters it shares with its twin: torch.nn reads a reference of None as "unchanged" (an
    empty list failed its length check at the old module's next call; review, session 31).
    What it no longer sees is a parameter substituted by torch.func.functional_call."""
    if isinstance(old, nn.RNNBase):
        old._flat_weight_refs = [None] * len(old._flat_weights_names)
    else:
        from . import _inference
        _inference.forget(old)


def _constructor_arguments(module: nn.Module) -> dict:
    if isinstance(module, (nn.RNNBase, modules.RNNBase)):
        arguments = {name: getattr(module, name) for name in _SEQUENCE_ARGUMENTS}
        if module.mode == "LSTM":
            arguments["proj_size"] = module.proj_size
        elif module.mode in ("RNN_TANH", "RNN_RELU"):
            arguments["nonlinearity"] = "relu" if module.mode == "RNN_RELU" else "tanh"
        return arguments
    arguments = {name: getattr(module, name) for name in _CELL_ARGUMENTS}
    if hasattr(module, "nonlinearity"):
        arguments["nonlinearity"] = module.nonlinearity
    return arguments
