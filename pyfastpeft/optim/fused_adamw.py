"""AdamW that keeps state only for what trains and updates it with one kernel launch per device/dtype.

Semantics per tensor are those of ``torch.optim.AdamW`` (decoupled weight decay, bias correction,
optional amsgrad and maximize); see csrc/ops/optim/optim.h for the update in plain math. On top:

* a tensor whose ``requires_grad`` is off is skipped and its moments are freed at the next step, with
  no rebuild of the optimizer; turned back on, it starts again from fresh moments;
* ``max_grad_norm`` clips by the total gradient norm inside the same update (the gradients are not
  rewritten) and ``step()`` returns that norm;
* ``l2sp`` pulls toward the values a tensor had when it first trained: g += l2sp·(θ − θ₀);
* ``master_weights`` keeps float32 copies of bfloat16/float16 tensors and updates those.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..ops.optim import fused_adamw_, multi_tensor_l2_norm

_MOMENTS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master")


class FusedAdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` with the same arguments and defaults, plus ``max_grad_norm``, ``l2sp`` and
    ``master_weights``. ``foreach``, ``capturable`` and ``fused`` are accepted for compatibility: this
    optimizer is always fused and always keeps its step counts and learning rate on the device."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        l2sp: float = 0.0,
        master_weights: bool = False,
    ) -> None:
        if differentiable:
            raise ValueError("differentiable: FusedAdamW updates in place and cannot be differentiated through")
        if not (isinstance(lr, torch.Tensor) or lr >= 0.0):
            raise ValueError(f"lr: expected a non-negative learning rate, got {lr}")
        if eps < 0.0:
            raise ValueError(f"eps: expected a non-negative value, got {eps}")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas: expected betas[{i}] in [0, 1), got {b}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay: expected a non-negative value, got {weight_decay}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm: expected a positive value or None, got {max_grad_norm}")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=False,
            fused=fused,
            l2sp=l2sp,
            master_weights=master_weights,
        )
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self._lr_tensors: dict[tuple[int, torch.device], tuple[float, torch.Tensor]] = {}

    # ---- state -------------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        use_master = group["master_weights"] and p.dtype in (torch.bfloat16, torch.float16)
        state_dtype = torch.float32 if use_master else p.dtype
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.contiguous_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.contiguous_format)
        if use_master:
            state["master"] = p.detach().to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        if group["l2sp"] != 0 and "anchor" not in state:
            # θ₀ is taken when the tensor first trains and kept when it is frozen, so an unfrozen
            # tensor is still pulled toward its pretrained value.
            state["anchor"] = p.detach().to(state_dtype, copy=True, memory_format=torch.contiguous_format)
        return state

    def _free_state(self, p: torch.Tensor) -> None:
        state = self.state.get(p)
        if state:
            for key in _MOMENTS:
                state.pop(key, None)
            if not state:
                del self.state[p]

    def _lr_tensor(self, gid: int, group: dict, device: torch.device) -> torch.Tensor:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            return lr.to(device=device, dtype=torch.float64)
        cached = self._lr_tensors.get((gid, device))
        if cached is None or cached[0] != lr:
            t = cached[1] if cached is not None else torch.empty((), dtype=torch.float64, device=device)
            t.fill_(float(lr))
            self._lr_tensors[(gid, device)] = (lr, t)
            return t
        return cached[1]

    # ---- step --------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One AdamW step over the tensors that require grad and have a gradient.

        Returns the closure's loss when a closure is given; otherwise the total gradient norm (a float32
        scalar tensor, before clipping) when ``max_grad_norm`` is set, else None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        buckets: list[tuple[int, dict, list[torch.Tensor]]] = []
        for gid, group in enumerate(self.param_groups):
            by_key: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if not p.requires_grad:
                    self._free_state(p)
                    continue
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("FusedAdamW: sparse gradients are not supported")
                if "step" not in self.state.get(p, {}):
                    self._init_state(p, group)
                by_key[(p.device, p.dtype)].append(p)
            buckets.extend((gid, group, ps) for ps in by_key.values())

        grads = {id(p): (p.grad if p.grad.is_contiguous() else p.grad.contiguous()) for _, _, ps in buckets for p in ps}
        total_norm, scales = None, {}
        if self.max_grad_norm is not None and buckets:
            total_norm, scales = self._clip_scales(buckets, grads)

        for gid, group, ps in buckets:
            device = ps[0].device
            states = [self.state[p] for p in ps]
            beta1, beta2 = group["betas"]
            # The kernel walks flat memory; a strided parameter (a transposed or sliced view) is updated
            # through a contiguous copy written back after the step.
            work = [p if p.is_contiguous() else p.contiguous() for p in ps]
            fused_adamw_(
                work,
                [grads[id(p)] for p in ps],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states],
                self._lr_tensor(gid, group, device),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                max_exp_avg_sqs=[s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else (),
                masters=[s["master"] for s in states] if "master" in states[0] else (),
                anchors=[s["anchor"] for s in states] if group["l2sp"] != 0 else (),
                l2sp=group["l2sp"],
                grad_scale=scales.get(device),
                maximize=group["maximize"],
            )
            for p, w in zip(ps, work, strict=True):
                if w is not p:
                    p.copy_(w)
        if loss is not None:
            return loss
        return total_norm

    def _clip_scales(self, buckets, grads) -> tuple[torch.Tensor, dict[torch.device, torch.Tensor]]:
        """Total norm over every gradient about to be applied, and min(1, max_norm / (norm + 1e-6)) per
        device, the coefficient torch.nn.utils.clip_grad_norm_ uses. Nothing leaves the device."""
        by_key: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for _, _, ps in buckets:
            for p in ps:
                by_key[(p.device, p.dtype)].append(grads[id(p)])
        norms = [multi_tensor_l2_norm(gs) for gs in by_key.values()]
        first = norms[0].device
        total = torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms])) if len(norms) > 1 else norms[0]
        coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
        devices = {d for d, _ in by_key}
        return total, {d: coef.to(d) for d in devices}

    # ---- state_dict --------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a FusedAdamW or a torch.optim.AdamW state dict. Moments keep the float32 precision of
        master-weight state; step counts move to the parameters' device."""
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"], strict=True):
            for pid, p in zip(saved_group["params"], group["params"], strict=True):
                if pid in saved_state and p in self.state:
                    self._restore(p, group, saved_state[pid])

    def _restore(self, p: torch.Tensor, group: dict, saved: dict) -> None:
        state = self.state[p]
        use_master = group["master_weights"] and p.dtype in (torch.bfloat16, torch.float16)
        state_dtype = torch.float32 if use_master else p.dtype
        for key, value in saved.items():
            if key == "step":
                value = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                state[key] = value.detach().to(device=p.device, dtype=torch.float32, copy=True).reshape(())
            elif isinstance(value, torch.Tensor):
                dtype = torch.float32 if key == "master" else state_dtype
                value = value.detach().to(
                    device=p.device, dtype=dtype, copy=True, memory_format=torch.contiguous_format
                )
                state[key] = value.reshape(p.shape)
        if use_master and "step" in state and "master" not in state:
            state["master"] = p.detach().to(torch.float32, copy=True, memory_format=torch.contiguous_format)


def lora_plus_param_groups(
    model: torch.nn.Module,
    lr: float,
    lr_ratio: float = 16.0,
    weight_decay: float = 1e-2,
) -> list[dict[str, Any]]:
    """LoRA+ parameter groups: every trainable ``lora_B`` tensor learns ``lr_ratio`` times faster than
    the rest (``lora_A``, biases, heads). Pass the result to FusedAdamW."""
    fast, base = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (fast if "lora_B" in name else base).append(p)
    groups = [{"params": base, "lr": lr, "weight_decay": weight_decay}]
    if fast:
        groups.append({"params": fast, "lr": lr * lr_ratio, "weight_decay": weight_decay})
    return groups
