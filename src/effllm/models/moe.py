"""Top-k routed mixture of SwiGLU experts (Mixtral-style), the decoder's feed-forward when
``num_experts > 0``.

Routing, as Mixtral: softmax over *all* experts, keep the k largest probabilities, renormalise
those k weights to sum to 1, output = Σ_k weight · expert(x).

Each expert is a plain :class:`~effllm.models.layers.MLP` (``gate_proj``/``up_proj``/
``down_proj`` ``nn.Linear``s), not a fused 3-D weight, so that

* peft's LoRA ``target_modules`` and bitsandbytes' Linear replacement reach the experts, and
* ``FlopCounterMode`` counts the expert matmuls (transformers 5.x's default ``grouped_mm``
  experts count 0; docs/metrics.md §7) — the count is the *active* compute, 2·tokens·k·expert.

The router is ``router`` (not Mixtral's ``gate``) so no ``gate_proj``-style pattern catches it.
The toolkit's MoE ran silently dense (docs/protocol.md §8, defect 5): :func:`moe_param_counts`
reports total and active parameters so a run can prove it is sparse.
"""

from __future__ import annotations

import torch
from torch import nn

from effllm.models.config import DecoderConfig
from effllm.models.layers import MLP
from effllm.models.params import count_params


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int
                        ) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss  E · Σ_i f_i · P_i  of one layer.

    ``probs`` [N, E]: router softmax over all experts; ``experts`` [N, k]: chosen experts.
    f_i = share of the N·k token→expert assignments that go to expert i (Σ f_i = 1, not
    differentiable); P_i = mean router probability of expert i over the N tokens (differentiable:
    the gradient pushes probability away from over-loaded experts).

    Normalisation: the loss is 1 for balanced routing (uniform f *or* uniform P, whatever k) and
    grows towards E as routing collapses onto one expert. (Because f and P are batch averages,
    contrived batches can dip slightly below 1; 1 is the balanced value, the usual "minimum".)
    transformers' ``load_balancing_loss_func`` divides the assignment counts by N instead of N·k,
    so it equals **k ×** this value (balanced value k); multiply its coefficient by k to compare.
    """
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts)
    f = counts.to(probs.dtype) / experts.numel()
    return num_experts * (f * probs.mean(0)).sum()


class MoE(nn.Module):
    """``num_experts`` SwiGLU experts, each token sent to ``num_experts_per_tok`` of them.

    ``forward(x [B, T, H]) -> (y [B, T, H], aux_loss scalar)``; the decoder averages ``aux_loss``
    over layers and adds ``router_aux_loss_coef ×`` it to the LM loss. Padding tokens are routed
    (and counted in the aux loss) like any other: the block sees no attention mask.
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(self.num_experts)
        )

    def route(self, x: torch.Tensor):
        """x [N, H] -> (logits [N, E], probs [N, E], weights [N, k], experts [N, k]).

        Softmax in fp32 (a bf16 softmax over experts changes the top-k under ties), weights
        renormalised over the chosen k so the output scale does not depend on E.
        """
        logits = self.router(x)
        probs = logits.float().softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, weights, experts

    def forward(self, x: torch.Tensor):
        b, t, h = x.shape
        x = x.reshape(-1, h)
        _, probs, weights, experts = self.route(x)
        # Group the N·k (token, expert) assignments by expert: one sort, one loop over experts.
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // self.top_k  # assignment j belongs to token j // k
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # one host sync
        chunks = x[token].split(counts)
        # Skip idle experts: they get no gradient (None) rather than a zero one. Under DDP/FSDP
        # every rank must hand in every expert's gradient, so an idle one runs on its empty chunk
        # (zero gradient, zero FLOPs).
        every = torch.distributed.is_available() and torch.distributed.is_initialized()
        outs = [expert(chunk) for expert, chunk, n in zip(self.experts, chunks, counts)
                if n or every]
        out = torch.cat(outs) * weights.reshape(-1)[order, None]
        y = torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))
        return y.view(b, t, h), load_balancing_loss(probs, experts, self.num_experts)


def moe_param_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active) parameters of a model; tied weights counted once.

    Active = what one token uses: total minus, in every :class:`MoE` layer, the ``E − k``
    experts it skips. A dense model gives active == total.
    """
    total = count_params(model)[0]
    inactive = sum(
        (m.num_experts - m.top_k) * sum(p.numel() for p in m.experts[0].parameters())
        for m in model.modules() if isinstance(m, MoE)
    )
    return total, total - inactive
