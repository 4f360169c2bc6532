"""Supervised loss on the answer only: a chat tokenised with its prompt masked out, a batch of
such rows padded, and the causal-LM loss over the answer tokens (used by SFT; PPO's policy forward
asks the same question of the model, whether it can compute logits at its last positions only).
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch

from cai.errors import CaiError
from cai.padding import pad_rows
from cai.prompts import format_conversation
from cai.types import Chat


IGNORE = -100


def tokenize_for_answer_loss(tokenizer: Any, messages: Chat, max_length: int) -> tuple[list[int], list[int]] | None:
    """Token ids and labels for one chat whose last message is the assistant answer to learn.

    Labels are ``-100`` on the prompt (everything up to the answer) so the loss covers only the
    assistant's tokens, including the end-of-turn marker that teaches it to stop. A chat longer
    than ``max_length`` loses tokens from the left of its prompt; if the answer alone is longer it
    is cut on the right. Returns None when nothing of the answer is left.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise CaiError("an SFT example must end with an assistant message")
    if getattr(tokenizer, "chat_template", None):
        prompt_text = tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(list(messages), tokenize=False)
        if not full_text.startswith(prompt_text):
            raise CaiError("the model's chat template renders the prompt differently inside the full chat; "
                           "use prompt_format: text for this model")
        answer_text = full_text[len(prompt_text):]
    else:
        prompt_text = format_conversation(list(messages[:-1])) + "\n\nAssistant:"
        answer_text = " " + messages[-1]["content"] + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
    if not answer_ids:
        return None
    answer_ids = answer_ids[:max_length]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - (max_length - len(answer_ids))):] if max_length > len(answer_ids) else []
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def pad_batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (ids, labels) pairs into input_ids / attention_mask / labels tensors (labels padded with -100)."""
    input_ids, mask = pad_rows([ids for ids, _ in examples], pad_id, "right")
    labels, _ = pad_rows([lab for _, lab in examples], IGNORE, "right", input_ids.shape[1])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the causal LM under ``model`` (a peft or DDP wrapper or not) can compute logits at its last positions only."""
    model = getattr(model, "module", model)  # DDP
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def answer_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal-LM loss of a `pad_batch` batch: the mean cross-entropy over its answer tokens.

    The same value as ``model(**batch).loss``, but the LM head runs only from the first position
    that predicts an answer token onwards: a prompt's positions never need the [T, vocabulary]
    logits (with a 49k vocabulary they and their softmax were the largest activations of a step).
    """
    labels = batch["labels"]
    predicts = (labels[:, 1:] != IGNORE).any(0).nonzero()  # position t predicts labels[:, t + 1]
    if not len(predicts) or not accepts_logits_to_keep(model):
        return model(**batch).loss
    first = int(predicts[0])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=labels.shape[1] - first).logits  # positions first .. T-1
    # Shift the labels, not the logits (a slice of the logits would be copied): position t is scored
    # on labels[t + 1], and the last position on nothing.
    targets = torch.nn.functional.pad(labels[:, first + 1:], (0, 1), value=IGNORE)
    return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=IGNORE)


def answer_tokens(labels: Sequence[int]) -> int:
    """How many tokens of a row the causal-LM loss averages over (labels shift by one: the first predicts nothing)."""
    return sum(1 for label in labels[1:] if label != IGNORE)
