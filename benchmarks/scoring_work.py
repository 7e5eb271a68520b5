"""How much model work each scoring system does on the scoring benchmark's rows: the speed-up ceiling.

On this machine's CPU both hubkit and lm-eval's vLLM backend are bound by float32 matrix products (the
same vLLM engine and the same model code run both), so the ratio of their FLOPs is the most hubkit can be
faster while computing the same numbers. This script counts that work without starting an engine:

* lm-eval's vLLM backend: one request per (context, continuation) pair with ``prompt_logprobs``, so every
  token of context + continuation is forwarded and gets logits (the LM head) at its position.
* hubkit: :func:`hubkit.backends.vllm.plan_scoring`'s chains, exactly as ``hubkit score`` sends them
  (``greedy=False``): a chain prefills its prompt once (a second chain of the same question reads the
  context's whole KV blocks from the prefix cache) and forwards one token per forced step; logits are
  computed only at the positions read, and the last layer's output projection and MLP only at the
  prefill position read (``hubkit score``'s engines run without prompt log-probs).

FLOPs per token are the model's matrix products (QKV, attention output, MLP: ``2 * params``) plus the
attention scores and values over the prefix (``4 * d_model * position`` per layer). Prompt tokens are the
benchmark's own (`benchmarks/scoring.py`'s ``build_pairs``: hubkit's ``nsmc`` task, same few-shot seed).

    .venv/bin/python benchmarks/scoring_work.py --data ../shared/data/nsmc/ratings_test.txt \
        --train ../shared/data/nsmc/ratings_train.txt      # writes benchmarks/results/scoring-work.md
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scoring import build_pairs, read_nsmc  # noqa: E402  (the benchmark's own prompts)

from hubkit.backends.vllm import CPU_BLOCK_SIZE  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """The dimensions that set a decoder's FLOPs per token."""

    name: str
    layers: int
    d_model: int
    d_ff: int
    vocab: int

    @property
    def body_flops(self) -> float:
        """Matrix-product FLOPs of one token through the layers (no LM head, no attention scores)."""
        return 2.0 * self.layers * (4 * self.d_model**2 + 2 * self.d_model * self.d_ff)

    @property
    def unread_saving(self) -> float:
        """FLOPs a prefill position nobody reads skips: the last layer's output projection and MLP."""
        return 2.0 * (self.d_model**2 + 2 * self.d_model * self.d_ff)

    @property
    def head_flops(self) -> float:
        return 2.0 * self.d_model * self.vocab

    def attention_flops(self, position: int) -> float:
        """QK scores and the weighted sum of values for a token at ``position`` (0-based)."""
        return 4.0 * self.layers * self.d_model * (position + 1)

    def forward(self, start: int, stop: int) -> float:
        """FLOPs of forwarding positions ``start .. stop-1`` (the KV of earlier positions is cached)."""
        return sum(self.body_flops + self.attention_flops(p) for p in range(start, stop))

    @classmethod
    def from_config(cls, name: str, config: Any) -> Shape:
        return cls(
            name,
            layers=config.num_hidden_layers,
            d_model=config.hidden_size,
            d_ff=config.intermediate_size,
            vocab=config.vocab_size,
        )


def model_config(name: str, tokenizer: Any) -> Any:
    """The benchmarked model's config: the shipped default's, or the preset's with the default tokenizer."""
    from transformers import AutoConfig

    from hubkit.models import resolve_model
    from hubkit.presets import build_config

    if name == "default":
        return AutoConfig.from_pretrained(resolve_model("default"))
    return build_config(name, vocab_size=len(tokenizer))  # as benchmarks/scoring.py's build_25m builds it


def count_work(inputs: Sequence[tuple[list[int], int]], shape: Shape, max_model_len: int) -> dict[str, float]:
    """FLOPs (and forwarded tokens) of lm-eval's vLLM way and of hubkit's plan for the same inputs."""
    from hubkit.backends.vllm import plan_scoring

    lm_tokens = sum(len(tokens) for tokens, _ in inputs)
    lm_flops = sum(shape.forward(0, len(tokens)) + len(tokens) * shape.head_flops for tokens, _ in inputs)
    plan = plan_scoring(
        inputs,
        block_size=CPU_BLOCK_SIZE,
        prefix_caching=True,
        max_model_len=max_model_len,
        greedy=False,
        prompt_logprobs=False,  # `hubkit score`'s multiple-choice engines
    )
    hub_flops = hub_tokens = 0.0
    cached: set[tuple[int, ...]] = set()  # contexts whose whole blocks an earlier chain computed
    for chain in plan.chains:
        # The context is the chain's prompt minus its trie path; the planner groups by context, so the
        # shortest prompt of a group is the context itself or one token past it.
        prompt = chain.prompt
        key = prompt[: len(prompt) - 1]
        start = 0
        for k in (len(prompt), len(prompt) - 1):
            if prompt[:k] in cached:
                start = (k // CPU_BLOCK_SIZE) * CPU_BLOCK_SIZE
                break
        start = min(start, len(prompt) - 1)  # vLLM recomputes at least the last prompt token
        cached.update({prompt, key})
        steps = len(chain.forced) + len(chain.report)
        hub_tokens += len(prompt) - start + steps
        hub_flops += shape.forward(start, len(prompt) + steps) + (1 + steps) * shape.head_flops
        # Only the last prompt position of the prefill is read (engines without prompt log-probs).
        hub_flops -= (len(prompt) - start - 1) * shape.unread_saving
    # Inputs the planner sends through prompt log-probs cost what lm-eval's way costs.
    for i in plan.prompt_logprobs:
        tokens = inputs[i][0]
        hub_tokens += len(tokens)
        hub_flops += shape.forward(0, len(tokens)) + len(tokens) * shape.head_flops
    return {
        "lm_eval_tokens": float(lm_tokens),
        "lm_eval_gflop": lm_flops / 1e9,
        "hubkit_tokens": hub_tokens,
        "hubkit_gflop": hub_flops / 1e9,
        "ceiling": lm_flops / hub_flops,
        "requests_lm_eval": float(len(inputs)),
        "requests_hubkit": float(plan.num_requests),
    }


def measured_ratios(path: Path) -> dict[tuple[str, int, str], float]:
    """hubkit's measured ratio vs the faster lm-eval backend, from a scoring benchmark's JSON."""
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["rows"]
    best: dict[tuple[str, int], float] = {}
    for r in rows:
        if r["system"].startswith("lm-eval"):
            key = (r["model"], r["shots"])
            best[key] = max(best.get(key, 0.0), r["rows"] / r["seconds"])
    return {
        (r["model"].split(" ")[0], r["shots"], r["system"]): (r["rows"] / r["seconds"])
        / best[r["model"], r["shots"]]
        for r in rows
        if r["system"] in ("hubkit x1", "hubkit x2") and (r["model"], r["shots"]) in best
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="NSMC ratings_test.txt")
    parser.add_argument("--train", type=Path, required=True, help="NSMC ratings_train.txt (few-shot source)")
    parser.add_argument("--shots", default="0,5")
    parser.add_argument("--rows", default="default=5000,neox-25m=1000", help="rows per model, as benchmarked")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scoring-work.md")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from hubkit.backends.transformers import context_length
    from hubkit.backends.vllm import encode_scoring_inputs
    from hubkit.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("default"))
    test, train = read_nsmc(args.data), read_nsmc(args.train)
    measured = {
        **measured_ratios(ROOT / "benchmarks" / "results" / "scoring.json"),
        **measured_ratios(ROOT / "benchmarks" / "results" / "scoring-25m.json"),
    }
    lines = [
        "Model work of scoring NSMC `ratings_test.txt` (2 choices per row), counted from the prompts and "
        "hubkit's own scoring plan by `benchmarks/scoring_work.py` (no engine). On this CPU both systems are "
        "bound by float32 matrix products in the same vLLM engine, so the FLOP ratio is the ceiling of "
        "hubkit's speed-up at equal numbers. Measured ratios: `benchmarks/results/scoring*.json`.",
        "",
        "| model | shots | rows | tokens forwarded lm-eval vllm / hubkit | GFLOP lm-eval vllm / hubkit | "
        "ceiling (FLOP ratio) | measured hubkit x1 / x2 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    results = []
    for spec in args.rows.split(","):
        name, rows = spec.split("=")
        config = model_config(name, tokenizer)
        shape = Shape.from_config(name, config)
        max_model_len = context_length(config, tokenizer)  # the rule VLLMBackend applies
        for shots in [int(s) for s in args.shots.split(",")]:
            pairs, _ = build_pairs(test[: int(rows)], train, shots)
            inputs = encode_scoring_inputs(tokenizer, pairs, max_model_len=max_model_len)
            work = count_work(inputs, shape, max_model_len)
            results.append({"model": name, "shots": shots, "rows": int(rows), **work})
            x1 = measured.get((name, shots, "hubkit x1"))
            x2 = measured.get((name, shots, "hubkit x2"))
            seen = f"{x1:.2f}x / {x2:.2f}x" if x1 and x2 else ""
            lines.append(
                f"| {shape.name} | {shots} | {rows} | {work['lm_eval_tokens']:,.0f} / {work['hubkit_tokens']:,.0f} | "
                f"{work['lm_eval_gflop']:,.1f} / {work['hubkit_gflop']:,.1f} | {work['ceiling']:.2f}x | {seen} |"
            )
            print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps({"schema": 1, "rows": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
