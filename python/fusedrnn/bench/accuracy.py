"""Max relative error of an implementation against torch.nn in float64 on the same weights and
inputs: max over every output and (training) every gradient of ||a - b|| / ||b||."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

# What a correct kernel reaches against a float64 reference (DESIGN.md, "Testing"): fp32 far under
# 1e-5 on small shapes; 1e-4 leaves room for long sequences. Half types are judged against
# torch.nn's own error in that dtype: at most twice it plus two unit roundoffs (torch's error on
# one draw can be ~0, and the bar must not then ask for less than rounding gives), and a fixed
# bar where torch did not run.
TOLERANCE = {"float64": 1e-9, "float32": 1e-4}
UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
HALF_FLOOR = {"float16": 1e-2, "bfloat16": 5e-2}


@dataclass
class ErrorReport:
    max_rel_err: Optional[float]     # None when something was non-finite or missing
    worst: str                       # the tensor that gave the max (or the problem)
    note: str = ""


def compare(found: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> ErrorReport:
    worst_err, worst_name = 0.0, ""
    for name, ref in expected.items():
        if ref is None:
            continue
        got = found.get(name)
        if got is None:
            return ErrorReport(None, name, f"{name} missing (expected shape {tuple(ref.shape)})")
        if got.shape != ref.shape:
            return ErrorReport(None, name, f"{name} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        got = got.detach().to(device=ref.device, dtype=torch.float64)
        if not torch.isfinite(got).all():
            return ErrorReport(None, name, f"non-finite values in {name}")
        denom = float(ref.norm())
        err = float((got - ref).norm()) / (denom if denom > 0 else 1.0)
        if not math.isfinite(err):  # (a NaN compares false with every error: it would be lost)
            return ErrorReport(None, name, f"non-finite reference or error in {name}")
        if err > worst_err or not worst_name:
            worst_err, worst_name = err, name
    return ErrorReport(worst_err, worst_name)


def within_tolerance(dtype: str, err: Optional[float], torch_err: Optional[float]) -> bool:
    if err is None or math.isnan(err):
        return False
    if dtype in TOLERANCE:
        return err <= TOLERANCE[dtype]
    if torch_err is None or math.isnan(torch_err):
        return err <= HALF_FLOOR.get(dtype, 1e-2)
    return err <= 2.0 * torch_err + 2.0 * UNIT_ROUNDOFF.get(dtype, 2.0 ** -8)
