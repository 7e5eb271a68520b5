"""A vLLM logits processor that walks a request down given tokens, for hubkit's exact scoring.

vLLM loads it into its engine processes by name (``logits_processors=[FORCED_TOKENS_FQCN]``); the vLLM
backend registers it, and only its scoring requests use it. A request that carries
``SamplingParams.extra_args[FORCED_TOKENS_ARG] = [t0, ..., t(m-1)]`` and
``extra_args[REPORT_STEPS_ARG] = [k0, k1, ...]`` (greedy, ``max_tokens = m + 1 + len(report steps)``,
``ignore_eos``) generates:

* steps ``0..m-1``: exactly ``t0..t(m-1)``, every other logit set to -inf, after recording the argmax of
  the raw logits it overrides;
* step ``m``: freely (plain greedy);
* then, one step each: the argmax recorded at steps ``k0, k1, ...``, so that the caller learns the
  greedy token at those forced steps from the generated tokens. (At a step whose only question is
  whether the forced token itself is greedy, the caller reads the forced token's rank instead.)

The log-probs the caller reads are untouched: vLLM computes them from the raw logits before any logits
processor runs (``logprobs_mode="raw_logprobs"``).

This module imports torch and vLLM; nothing imports it but vLLM's engine (by name) and the backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

FORCED_TOKENS_ARG = "hubkit_forced_tokens"
REPORT_STEPS_ARG = "hubkit_report_steps"
FORCED_TOKENS_FQCN = "hubkit.backends.vllm_forced:ForcedTokens"
#: Where a request keeps the argmaxes recorded so far. It lives in the request's own extra_args, which
#: the worker keeps across preemption, so a recomputed request still reports every forced step.
_SEEN_ARG = "_hubkit_forced_argmax"


class ForcedTokens(LogitsProcessor):
    """Forces each marked request's first tokens, then reports the greedy tokens it overrode."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        # batch row -> (forced tokens, steps to report, the request's live output tokens, recorded argmaxes)
        self.rows: dict[int, tuple[tuple[int, ...], tuple[int, ...], list[int], list[int]]] = {}
        self.device = device

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        extra = sampling_params.extra_args or {}
        forced, report = extra.get(FORCED_TOKENS_ARG), extra.get(REPORT_STEPS_ARG, [])
        if forced is None:
            return
        if not isinstance(forced, list | tuple) or not all(isinstance(t, int) and t >= 0 for t in forced):
            raise ValueError(f"{FORCED_TOKENS_ARG} must be a list of token ids")
        if not isinstance(report, list | tuple) or not all(
            isinstance(k, int) and 0 <= k < len(forced) for k in report
        ):
            raise ValueError(f"{REPORT_STEPS_ARG} must list forced steps (0 to {len(forced) - 1})")
        if sampling_params.max_tokens != len(forced) + 1 + len(report):
            raise ValueError(
                f"{FORCED_TOKENS_ARG} and {REPORT_STEPS_ARG} need max_tokens={len(forced) + 1 + len(report)}"
            )

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the greedy token

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, _new_row)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        rows: list[int] = []
        tokens: list[int] = []
        for row, (forced, report, output, seen) in self.rows.items():
            step, m = len(output), len(forced)
            if step < m:
                if report and len(seen) == step:  # once per step, and only if a report step reads it
                    seen.append(int(torch.argmax(logits[row])))
                token = forced[step]
            elif m < step <= m + len(report):
                token = seen[report[step - m - 1]]
            else:
                continue  # the free step, or done
            rows.append(row)
            tokens.append(token)
        if rows:
            index = torch.tensor(rows, dtype=torch.long, device=logits.device)
            column = torch.tensor(tokens, dtype=torch.long, device=logits.device)
            logits[index] = float("-inf")
            logits[index, column] = 0.0
        return logits


def _new_row(
    params: SamplingParams, _prompt: list[int] | None, output: list[int]
) -> tuple[tuple[int, ...], tuple[int, ...], list[int], list[int]] | None:
    extra: dict[str, Any] | None = params.extra_args if params is not None else None
    forced = (extra or {}).get(FORCED_TOKENS_ARG)
    if not forced:
        return None
    seen = extra.setdefault(_SEEN_ARG, [])  # type: ignore[union-attr]
    return tuple(forced), tuple(extra.get(REPORT_STEPS_ARG, ())), output, seen  # type: ignore[union-attr]
