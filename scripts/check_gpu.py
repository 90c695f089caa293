"""Check the torch preference losses on a GPU against the float64 NumPy reference.

For every loss type, a couple of betas and label-smoothing values, and both
float32 and float64, this builds one concatenated batch [chosen; rejected] of
random logits, computes the mean loss and its gradients with torch autograd on
the device (log_softmax, gather, masked sum, ``minidpo.losses.preference_loss``),
and compares three quantities with ``minidpo.numpy_ref``'s hand-derived float64
values (computed from the same, dtype-rounded inputs):

    loss       the mean preference loss over the B pairs
    dlogps     d loss / d (sequence log-prob), shape (2B,)
    dlogits    d loss / d logits, shape (2B, T, V)

It prints, per dtype, loss type and quantity, the max absolute and max relative
error and PASS/FAIL against |torch - ref| <= atol + rtol |ref|; exit 1 on any
failure. With no CUDA it prints one line and exits 0.

    python scripts/check_gpu.py [--device cuda|cpu] [--out results.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

try:
    import minidpo  # noqa: F401
except ImportError:  # run as a plain script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minidpo import numpy_ref
from minidpo.atomic import atomic_write_json
from minidpo.losses import LOSS_TYPES, preference_loss

# (rtol, atol) per dtype. atol covers exact zeros (masked tokens, the flat side of the
# hinge) and references that are a cancellation of O(10)-sized log-probs, e.g. IPO's
# 2 (h - 1/(2 beta)) near its optimum, where float32 can only be accurate to ~1e-6 absolute.
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-10, 1e-13)}
BETAS = (0.1, 0.5)
SMOOTHINGS = {"sigmoid": (0.0, 0.2), "robust": (0.0, 0.2), "ipo": (0.0,), "hinge": (0.0,)}
QUANTITIES = ("loss", "dlogps", "dlogits")


def make_batch(
    rng: np.random.Generator, b: int = 4, t: int = 8, v: int = 16
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random logits (2B, T, V), labels (2B, T), right-padded response mask (2B, T), ref (2B,).

    The reference log-probs are the policy's own plus noise, so the margins h are
    of order one and the hinge loss has pairs on both sides of its kink.
    """
    logits = rng.normal(size=(2 * b, t, v))  # (2B, T, V)
    labels = rng.integers(0, v, size=(2 * b, t))  # (2B, T)
    start = rng.integers(1, t // 2, size=2 * b)  # prompt length per row
    stop = rng.integers(t // 2 + 1, t + 1, size=2 * b)  # end of response per row
    pos = np.arange(t)[None, :]  # (1, T)
    mask = ((pos >= start[:, None]) & (pos < stop[:, None])).astype(np.float64)  # (2B, T)
    seq = numpy_ref.sequence_logprobs(logits, labels, mask)  # (2B,)
    ref_logps = seq + rng.normal(scale=2.0, size=2 * b)  # (2B,)
    return logits, labels, mask, ref_logps


def torch_loss_and_grads(
    logits: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray,
    ref_logps: np.ndarray,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float,
    device: str,
    dtype: torch.dtype,
) -> dict[str, np.ndarray]:
    """Mean loss, d/dlogps (2B,) and d/dlogits (2B, T, V) by torch autograd on `device`."""
    z = torch.tensor(logits, dtype=dtype, device=device, requires_grad=True)  # (2B, T, V)
    y = torch.tensor(labels, device=device)  # (2B, T)
    m = torch.tensor(mask, dtype=dtype, device=device)  # (2B, T)
    ref = torch.tensor(ref_logps, dtype=dtype, device=device)  # (2B,)
    token_logp = torch.log_softmax(z, dim=-1).gather(-1, y[..., None]).squeeze(-1)  # (2B, T)
    seq = (token_logp * m).sum(-1)  # (2B,)
    seq.retain_grad()
    b = seq.shape[0] // 2
    out = preference_loss(
        seq[:b], seq[b:], ref[:b], ref[b:],
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
    )  # fmt: skip
    loss = out.losses.mean()
    loss.backward()
    return {"loss": _np(loss), "dlogps": _np(seq.grad), "dlogits": _np(z.grad)}


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


def reference_loss_and_grads(
    logits: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray,
    ref_logps: np.ndarray,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float,
) -> dict[str, np.ndarray]:
    """The same three quantities from the hand-derived float64 NumPy reference."""
    b = logits.shape[0] // 2
    seq = numpy_ref.sequence_logprobs(logits, labels, mask)  # (2B,)
    out = numpy_ref.preference_loss(
        seq[:b], seq[b:], ref_logps[:b], ref_logps[b:],
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
    )  # fmt: skip
    dlogps = np.concatenate([out.grad_policy_chosen, out.grad_policy_rejected]) / b  # (2B,)
    loss, dlogits = numpy_ref.dpo_logit_gradient(
        logits, labels, mask, ref_logps, beta, loss_type, label_smoothing
    )
    return {"loss": np.asarray(loss), "dlogps": dlogps, "dlogits": dlogits}


def errors(got: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> dict[str, float | bool]:
    """Max absolute error, max relative error (over nonzero references) and the allclose test."""
    diff = np.abs(got - want)
    nonzero = np.abs(want) > 0
    max_rel = float(np.max(diff[nonzero] / np.abs(want[nonzero]))) if nonzero.any() else 0.0
    ok = bool(np.all(diff <= atol + rtol * np.abs(want)))
    return {"max_abs": float(np.max(diff)), "max_rel": max_rel, "pass": ok}


def run_checks(device: str, seed: int = 0) -> list[dict]:
    """Every (dtype, loss type, beta, label smoothing, quantity) comparison, as dict rows."""
    rows = []
    for dtype, (rtol, atol) in TOLERANCES.items():
        rng = np.random.default_rng(seed)
        for loss_type in LOSS_TYPES:
            for beta in BETAS:
                for eps in SMOOTHINGS[loss_type]:
                    logits, labels, mask, ref = make_batch(rng)
                    # round the inputs to `dtype` so the reference sees the same numbers
                    logits = torch.tensor(logits, dtype=dtype).double().numpy()
                    ref = torch.tensor(ref, dtype=dtype).double().numpy()
                    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=eps)
                    got = torch_loss_and_grads(
                        logits, labels, mask, ref, device=device, dtype=dtype, **kw
                    )
                    want = reference_loss_and_grads(logits, labels, mask, ref, **kw)
                    for q in QUANTITIES:
                        rows.append(
                            {"dtype": str(dtype).removeprefix("torch."), **kw, "quantity": q,
                             "rtol": rtol, "atol": atol, **errors(got[q], want[q], rtol, atol)}
                        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device to check (default cuda)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random batches")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"no CUDA device available (torch {torch.__version__}): GPU check skipped")
        return 0
    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(args.device))
    else:
        name = f"cpu ({args.device})"
    rows = run_checks(args.device, args.seed)
    print(f"device: {name}   torch {torch.__version__}   numpy {np.__version__}")
    print(f"{'dtype':8} {'loss_type':9} {'quantity':8} {'max_abs':>10} {'max_rel':>10} "
          f"{'rtol':>7} {'atol':>7}  result")  # fmt: skip
    for dtype in ("float32", "float64"):
        for loss_type in LOSS_TYPES:
            for q in QUANTITIES:
                sel = [
                    r for r in rows
                    if r["dtype"] == dtype and r["loss_type"] == loss_type and r["quantity"] == q
                ]  # fmt: skip
                max_abs = max(r["max_abs"] for r in sel)
                max_rel = max(r["max_rel"] for r in sel)
                ok = all(r["pass"] for r in sel)
                print(f"{dtype:8} {loss_type:9} {q:8} {max_abs:10.2e} {max_rel:10.2e} "
                      f"{sel[0]['rtol']:7.0e} {sel[0]['atol']:7.0e}  "
                      f"{'PASS' if ok else 'FAIL'}")  # fmt: skip
    n_fail = sum(not r["pass"] for r in rows)
    verdict = "PASS" if n_fail == 0 else f"FAIL ({n_fail} of {len(rows)} comparisons)"
    print(f"{len(rows)} comparisons (betas {BETAS}; label smoothing per loss type): {verdict}")
    if args.out is not None:
        atomic_write_json(
            args.out,
            {"device": name, "torch": torch.__version__, "numpy": np.__version__,
             "passed": n_fail == 0, "rows": rows},
        )  # fmt: skip
    return 0 if n_fail == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
