"""Forward passes of a policy and its value head over packed rollouts: PPO's log-probs, entropies and values.

A rollout is packed prompt-left, response-right (`pack`), so response token t of every row sits
at column P + t and one slice of the logits gives every row's response at once.
"""

from __future__ import annotations

from typing import Any

import torch

from cai.losses.ppo import entropy_from_logits, logprobs_from_logits
from cai.padding import pad_rows
from cai.train.answer_loss import accepts_logits_to_keep


class ValueHead(torch.nn.Module):
    """V(s) from the policy's final hidden state: one linear layer, started near zero."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.normal_(self.linear.weight, std=1e-3)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Values [B, T] from hidden states [B, T, H], in float32 whatever the model's dtype."""
        return self.linear(hidden.float()).squeeze(-1)


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, Any]:
    """Left-pad prompts to P and right-pad responses to T: response token t sits at column P + t.

    Returns input_ids/attention_mask/position_ids [B, P+T], response_mask [B, T] and P.
    """
    prompt_ids, prompt_mask = pad_rows(prompts, pad_id, "left")
    response_ids, response_mask = pad_rows(responses, pad_id, "right", max(1, max(len(r) for r in responses)))
    p_len = prompt_ids.shape[1]
    ids, mask = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
            "response_mask": mask[:, p_len:].float(), "prompt_len": p_len}


def forward_response(model: Any, value_head: ValueHead | None, batch: dict[str, Any],
                     entropy: bool = True) -> dict[str, torch.Tensor]:
    """Log-probs [B,T], entropy [B,T] (when asked) and values [B,T] of a packed batch's response tokens."""
    p = batch["prompt_len"]
    t = batch["input_ids"].shape[1] - p
    # Only the positions that predict response tokens go through the LM head: the [B, P+T, V] logits
    # and their softmax copies were most of PPO's activation memory, and the head ~20% of its FLOPs.
    keep = {"logits_to_keep": t + 1} if accepts_logits_to_keep(model) else {}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], output_hidden_states=value_head is not None, **keep)
    logits = out.logits[:, -(t + 1):-1]
    result = {"logprobs": logprobs_from_logits(logits, batch["input_ids"][:, p:])}
    if entropy:
        result["entropy"] = entropy_from_logits(logits)
    if value_head is not None:
        result["values"] = value_head(out.hidden_states[-1][:, p - 1:-1])
    return result


class PolicyWithValue(torch.nn.Module):
    """The policy and its value head as the one module PPO trains.

    ``accelerate.prepare`` wraps one module (DDP, DeepSpeed), so the two train as one: calling it
    runs `forward_response` on a packed batch. Saving still goes through ``policy`` and
    ``value_head`` separately.
    """

    def __init__(self, policy: Any, value_head: ValueHead) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = value_head

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return forward_response(self.policy, self.value_head, batch)


def batch_to(batch: dict[str, Any], device: torch.device, rows: list[int] | None = None) -> dict[str, Any]:
    """A packed batch on ``device``: its tensors (only ``rows`` of them, when given) moved, ``prompt_len`` kept."""
    return {k: (v[rows] if rows is not None else v).to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def forward_no_grad(model: Any, value_head: ValueHead | None, batch: dict[str, Any],
                    size: int) -> dict[str, torch.Tensor]:
    """Old-policy / reference log-probs (and values) of a rollout batch, a minibatch at a time,
    without the full-vocabulary entropy: [B, T, V] logits for a whole batch don't fit a GPU."""
    parts: list[dict[str, torch.Tensor]] = []
    with torch.no_grad():
        for start in range(0, batch["input_ids"].shape[0], size):
            rows = list(range(start, min(start + size, batch["input_ids"].shape[0])))
            parts.append(forward_response(model, value_head, batch_to(batch, batch["input_ids"].device, rows), entropy=False))
    return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
