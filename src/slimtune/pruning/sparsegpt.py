"""SparseGPT: prune one projection and update its remaining weights to reconstruct its outputs.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
arXiv 2301.00774. For a projection W [out, in] with calibration inputs X [tokens, in], SparseGPT
minimises ‖WXᵀ − ŴXᵀ‖² over Ŵ with the chosen sparsity, one row-independent OBS problem per row
sharing the Hessian H = 2·XᵀX / tokens:

- dampening: H += λ·I with λ = percdamp · mean(diag H) (1% by default, §4 of the paper);
- dead inputs (H_jj = 0, the feature is zero on every calibration token): H_jj = 1; their weights
  cost nothing on the calibration data, so they are pruned first and their loss counts as 0;
- U = the upper Cholesky factor of H⁻¹ (the paper's "Hessian synchronisation" in closed form);
- columns are processed left to right in blocks of `blocksize` (128). The mask of a block is chosen
  when the block is reached, from the *updated* weights (adaptive mask selection, §3.4): the lowest
  w²/U_cc² of the whole block (rows × block columns) are pruned, or for N:M the m−n lowest per
  row in every group of m columns, chosen when the group is reached;
- column c: q = w with its pruned entries zeroed, err = (w − q)/U_cc, the not-yet-processed
  columns of the block absorb −err ⊗ U[c, c:]; after the block the later columns absorb
  −Err·U[block, end:] at once (lazy batch updates, §3.3).

Differences from the paper's reference implementation, on purpose:
- a strict top-k: each block prunes its share int(out·end·p) − int(out·start·p) of the module's
  int(out·in·p), so the module sparsity is exact (a `≤ threshold` cut overshoots the target and
  prunes one weight per block even at p = 0);
- dead inputs are not zeroed up front, so at p = 0 the weights are left exactly as they were;
- a Cholesky failure is retried with 10× the dampening (three times) before giving up.
"""

from __future__ import annotations

import torch

from ..errors import SlimtuneError

RETRIES = 3  # extra Cholesky attempts, each with 10x the dampening


def check_hessian_tokens(tokens: int, widths: dict[str, int]) -> None:
    """SparseGPT needs at least as many calibration tokens as the widest projection input.

    XᵀX [in, in] has rank ≤ tokens: with fewer tokens than inputs the Hessian is singular, only the
    dampening makes it invertible, and the weight update fits the calibration tokens rather than
    the layer. This is the bare minimum: the paper uses 128 × 2048 tokens, and with tokens only a
    little above the width the update still overfits (on SmolLM2-135M with 2048 tokens for a 1536-wide
    down projection, SparseGPT at 50% came out worse than Wanda, which has no update to overfit)."""
    if not widths:
        return
    path, width = max(widths.items(), key=lambda kv: kv[1])
    if tokens < width:
        raise SlimtuneError(
            f"SparseGPT needs at least {width} calibration tokens ({path} has {width} inputs and XᵀX has rank ≤ tokens), got {tokens}; pass more or longer calibration sequences"
        )


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01, name: str = "") -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = percdamp·mean(diag H), fp32. On failure the
    dampening is multiplied by 10 up to RETRIES times. Returns (U, the percdamp that worked).
    `hessian` must already have its dead inputs set to 1 on the diagonal; it is not modified."""
    if not bool(torch.isfinite(hessian).all()):
        raise SlimtuneError(f"the calibration Hessian of {name or 'a projection'} is not finite (inf/nan activations); calibrate in fp32 or bf16 rather than fp16, or check the model")
    mean_diag = float(hessian.diagonal().mean())
    damp = percdamp
    for _ in range(RETRIES + 1):
        h = hessian.clone()
        h.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper, damp
        damp *= 10.0
    raise SlimtuneError(
        f"SparseGPT could not factor the Hessian of {name or 'a projection'} even at dampening {damp / 10:g}; raise percdamp (now {percdamp:g}) or calibrate on more tokens"
    )


def check_nm_width(n: int, m: int, in_features: int, blocksize: int, name: str = "") -> None:
    if not 0 < n < m:
        raise SlimtuneError(f"N:M pattern {n}:{m} is invalid; it needs 0 < n < m, e.g. 2:4 (keep 2 of every 4)")
    if in_features % m:
        raise SlimtuneError(f"{name or 'a projection'} has {in_features} inputs, not a multiple of m={m}; pick an m that divides {in_features} (2:4 needs a multiple of 4) or exclude that layer")
    if blocksize % m:
        raise SlimtuneError(f"blocksize {blocksize} is not a multiple of m={m}; pick a blocksize such as 128")


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float = 0.0,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    name: str = "",
    used: dict | None = None,
) -> tuple[torch.Tensor, float]:
    """Prune `weight` [out, in] in place (zeros at pruned entries, the kept ones updated) from the
    layer Hessian `hessian` [in, in] = 2·XᵀX / tokens (consumed: modified in place).

    Unstructured: exactly int(out·in·sparsity) weights are pruned. N:M (nm=(n, m)): exactly n kept
    in every m consecutive inputs of every row; `sparsity` is then ignored. Returns (keep mask,
    bool [out, in], True = kept; the OBS loss Σ (w−q)²/U_cc² / 2, which equals ‖(W − Ŵ)Xᵀ‖² / tokens
    when percdamp is 0). `used`, if given, gets the dampening the factorisation needed ("percdamp"),
    which is above the requested one when the retries raised it."""
    out_f, in_f = weight.shape
    if tuple(hessian.shape) != (in_f, in_f):
        raise RuntimeError(f"Hessian of {name} is {tuple(hessian.shape)}, expected {(in_f, in_f)}")
    if blocksize < 1:
        raise SlimtuneError(f"blocksize must be >= 1, got {blocksize}; the paper uses 128")
    if percdamp < 0:
        raise SlimtuneError(f"percdamp {percdamp} is negative; use a small positive fraction such as 0.01")
    if nm is not None:
        check_nm_width(*nm, in_f, blocksize, name)
    elif not 0.0 <= sparsity < 1.0:
        raise SlimtuneError(f"sparsity {sparsity} is outside [0, 1); pass a fraction such as 0.5")

    H = hessian.float()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    U, damp = inverse_hessian_factor(H, percdamp, name)
    if used is not None:
        used["percdamp"] = damp
    del H, hessian

    W = weight.detach().float().clone()
    pruned = torch.zeros(out_f, in_f, dtype=torch.bool, device=W.device)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    total_k = int(out_f * in_f * sparsity) if nm is None else 0

    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        cols = i2 - i1
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d1 = U1.diagonal()
        dead1 = dead[i1:i2].unsqueeze(0)  # [1, cols]
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        P1 = torch.zeros_like(W1, dtype=torch.bool)  # True = pruned

        if nm is None:
            k = int(out_f * i2 * sparsity) - int(out_f * i1 * sparsity)
            if k > 0:
                score = W1.square() / d1.square()
                score.masked_fill_(dead1, -1.0)  # free on the calibration data: first to go
                idx = torch.sort(score.flatten(), stable=True).indices[:k]
                P1.view(-1)[idx] = True

        for c in range(cols):
            if nm is not None and c % nm[1] == 0:
                n, m = nm
                score = W1[:, c : c + m].square() / d1[c : c + m].square()
                score.masked_fill_(dead1[:, c : c + m], -1.0)
                drop = torch.sort(score, dim=1, stable=True).indices[:, : m - n]
                P1[:, c : c + m].scatter_(1, drop, True)
            w = W1[:, c]
            d = d1[c]
            q = w.masked_fill(P1[:, c], 0.0)
            Q1[:, c] = q
            err = (w - q) / d
            W1[:, c:] -= err.unsqueeze(1) * U1[c, c:].unsqueeze(0)
            Err1[:, c] = err

        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = P1
        loss += Err1.double().square().masked_fill_(dead1, 0.0).sum() / 2  # dead inputs cost nothing
        if i2 < in_f:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if nm is None and int(pruned.sum()) != total_k:  # cannot happen: each block prunes its share
        raise RuntimeError(f"SparseGPT pruned {int(pruned.sum())} weights of {name}, expected {total_k}")
    W.masked_fill_(pruned, 0.0)
    weight.copy_(W.to(weight.dtype))
    return ~pruned, float(loss)
