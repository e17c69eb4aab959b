"""MuonH (Muon on a Frobenius sphere, the study's matrix optimizer) on top of DeepSpeed's Muon.

DeepSpeed hosts the Muon half: parameters flagged `use_muon` get Nesterov momentum and a Newton-Schulz
orthogonalisation of the whole matrix (under ZeRO 1/2 before the gradient is partitioned, with ZeRO 0 in the
optimizer step). MuonH adds, per matrix W with initial norm c = ||W_0||_F:

    W <- W - lr * c * U / ||U||_F          (the orthogonalised update U scaled to the sphere's radius)
    W <- c * W / ||W||_F                    (projected back onto the sphere; weight decay is then a no-op)

Both live in this optimizer's step, so nothing outside DeepSpeed's engine.step() is needed. Under ZeRO the step
sees flat fp32 partitions, not matrices: every matrix is its own param group, so a group's partition on each rank
holds one slice of one matrix and its Frobenius norms are one all-reduce of per-rank sums of squares away (ZeRO
steps group by group, so that is two small all-reduces per matrix and step). The projection therefore acts on DeepSpeed's fp32
master weights exactly, not on a bf16 copy. The AdamW half is torch's AdamW, DeepSpeed's auxiliary optimizer.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
from deepspeed.runtime.zero.muon.original_muon import muon_update


class MuonHWithAuxAdam(MuonWithAuxAdam):
    """Groups with `use_muon` hold one matrix each and carry its `sphere_norm`; the others go to torch AdamW.

    The class name keeps "Muon" in it: DeepSpeed's ZeRO recognises a Muon optimizer by its name.
    """

    def __init__(self, param_groups: list[dict], fused_adam: bool = False):
        for group in param_groups:
            if group["use_muon"] and (len(group["params"]) != 1 or "sphere_norm" not in group):
                raise ValueError(f"param group {group.get('name')!r}: a MuonH group holds exactly one matrix and its "
                                 "sphere_norm; build the groups with training.optim.param_groups")
        super().__init__(param_groups, adam_optimizer=torch.optim.AdamW,
                         adam_optimizer_kwargs={"fused": True} if fused_adam else {})

    @torch.no_grad()
    def step(self, closure=None, step_id=None):
        # ZeRO 1/2 call this once per param group (param_groups then holds just that group), ZeRO 3 once per group
        # with the other groups' params emptied, ZeRO 0 once for all.
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [g for g in self.param_groups if g["use_muon"] and g["params"]]
        if groups:
            weights = [g["params"][0] for g in groups]
            updates = [self._orthogonal_update(g) for g in groups]
            for g, w, u, norm in zip(groups, weights, updates, self._norms(updates)):
                w.sub_(u.to(w.dtype) * (g["lr"] * g["sphere_norm"] / norm))
            for g, w, norm in zip(groups, weights, self._norms(weights)):
                w.mul_(g["sphere_norm"] / norm)
        aux = [g for g in self.param_groups if not g["use_muon"] and g["params"]]
        if aux:
            self.aux_optimizer.param_groups = aux  # the same dicts, so the schedule's LR reaches AdamW
            self.aux_optimizer.state = self.state  # one state: checkpoints hold both halves
            self.aux_optimizer.step()
        return loss

    def _orthogonal_update(self, group: dict) -> torch.Tensor:
        p = group["params"][0]
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # as DeepSpeed's Muon: the momentum still moves it
        if p.dim() < 2:
            # A flat ZeRO (or bf16-optimizer) partition: DeepSpeed orthogonalised the whole matrix into its gradient.
            return p.grad
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return muon_update(p.grad, state["momentum_buffer"], beta=group["momentum"], ns_method=group["ns_method"])

    @staticmethod
    def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
        """||matrix||_F per matrix as device tensors (no host sync); a flat partition's matrix is spread over the
        data-parallel ranks, so their sums of squares are added first."""
        squares = torch.stack([t.float().square().sum() for t in tensors])
        if tensors[0].dim() < 2 and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(squares)
        return squares.sqrt().clamp_min(1e-10)  # a zero update moves nothing
