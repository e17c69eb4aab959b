"""Soft-capped cross-entropy of the LM head that never holds the full fp32 logits.

At T=2048, micro-batch 32 and a 32k vocabulary the plain loss materialises 65536 x 32064 fp32 logits (8.4 GB) plus
as much again for their gradient. Here rows go through the head in chunks: each chunk's logits live only while its
loss and its gradients (w.r.t. the hidden states and the head weight) are computed, in the forward pass itself, so
the backward pass only scales them and no matmul is repeated. The idea is Liger-Kernel's fused linear
cross-entropy; this is a plain-PyTorch form that torch.compile traces.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -1
DEFAULT_CHUNK_ROWS = 8192


def _capped_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float) -> torch.Tensor:
    logits = h @ weight.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 in, fp32 softmax
    return softcap * torch.tanh(logits / softcap) if softcap else logits


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, softcap, chunk_rows):
        n = h.shape[0]
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1).float()
        loss = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        grad_h = torch.empty_like(h)
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        for start in range(0, n, chunk_rows):
            end = min(start + chunk_rows, n)
            hc, tc, vc = h[start:end], targets[start:end], valid[start:end]
            capped = _capped_logits(hc, weight, softcap)
            lse = torch.logsumexp(capped, dim=-1)
            picked = capped.gather(1, tc.clamp(min=0).unsqueeze(1)).squeeze(1)
            loss = loss + ((lse - picked) * vc).sum()
            # d loss / d capped = softmax - onehot (per valid row, mean over valid rows)
            g = torch.exp(capped - lse.unsqueeze(1))
            g.scatter_add_(1, tc.clamp(min=0).unsqueeze(1), -torch.ones_like(picked).unsqueeze(1))
            g = g * (vc.to(g.dtype) / count).unsqueeze(1)
            if softcap:
                g = g * (1.0 - (capped / softcap).square())  # d(c tanh(z/c))/dz = 1 - tanh^2
            g = g.to(h.dtype)
            grad_h[start:end] = g @ weight
            grad_w += (g.t() @ hc).to(acc_dtype)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None


@torch.no_grad()
def _loss_only(h, weight, targets, softcap, chunk_rows):
    valid = targets != IGNORE_INDEX
    total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
    for start in range(0, h.shape[0], chunk_rows):
        end = min(start + chunk_rows, h.shape[0])
        capped = _capped_logits(h[start:end], weight, softcap)
        picked = capped.gather(1, targets[start:end].clamp(min=0).unsqueeze(1)).squeeze(1)
        total += ((torch.logsumexp(capped, dim=-1) - picked) * valid[start:end]).sum()
    return total / valid.sum().clamp(min=1)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float = 0.0,
                         chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Mean cross-entropy (nats) of softcap*tanh((h @ weight.T)/softcap) against `targets` (IGNORE_INDEX skipped).

    h: [..., d] final hidden states, weight: [V, d] LM head, targets: [...] token ids.
    """
    h2, t1 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h2, weight, t1, float(softcap), int(chunk_rows))
    return _loss_only(h2, weight, t1, float(softcap), int(chunk_rows))
