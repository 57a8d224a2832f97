"""Floating-point operation counts, so every row can say how close it runs to the machine's rate.

Counted: the matrix products, 2 FLOPs per multiply-add. Pointwise gate math is left out (it is
O(H) per step against O(H^2) for the products). Per layer l, per direction, per (step, sequence):

    input projection   2 * G*H * I_l          (x_t @ W_ih^T; I_0 = input_size, I_l = D*P after)
    recurrence         2 * G*H * P            (h_{t-1} @ W_hh^T)
    LSTM projection    2 * P*H                (h_t = (o*tanh c) @ W_hr^T, only with proj_size)

G = 4 (LSTM), 3 (CIFG LSTM, GRU), 1 (RNN); P = proj_size or H; D = directions. Inside a model
(in_model) its input and output layers add 2 * I*I + 2 * (D*P)^2. A
"(step, sequence)" pair is counted T*B times, or sum(lengths) times for packed batches. Training
(forward + backward) counts 3x the forward: the backward of each product is two products of the
same size (dX and dW).
"""
from __future__ import annotations

from typing import Optional, Sequence

from .configs import BenchConfig

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def flops_per_token(cfg: BenchConfig) -> int:
    """FLOPs of one forward (step, sequence) pair summed over layers and directions."""
    g, h, p, d = GATES[cfg.cell], cfg.hidden, cfg.state_size, cfg.directions
    if cfg.variant_kwargs().get("coupled_input_forget"):
        g = 3  # gates f, g, o
    total = 0
    for layer in range(cfg.layers):
        layer_in = cfg.in_size if layer == 0 else d * p
        per_dir = 2 * g * h * layer_in + 2 * g * h * p
        if cfg.proj_size:
            per_dir += 2 * p * h
        total += d * per_dir
    if cfg.in_model:  # the model's input and output layers (configs.BenchConfig.in_model)
        total += 2 * cfg.in_size * cfg.in_size + 2 * (d * p) ** 2
    return total


def count_flops(cfg: BenchConfig, mode: str, lengths: Optional[Sequence[int]] = None) -> int:
    tokens = int(sum(lengths)) if lengths is not None else cfg.seq_len * cfg.batch
    forward = flops_per_token(cfg) * tokens
    return forward * 3 if mode == "training" else forward
