"""``hubkit quickstart``: the main job on the embedded default model.

Starts (or joins) Ray, loads the model into a vLLM engine inside a Ray actor, generates continuations of a
handful of Korean prompts and prints them with throughput. Then, on the same engines, it scores NSMC
sentiment on the sample shipped with hubkit (0- and 5-shot, a run folder like ``hubkit score`` writes), and
publishes the model with a card that reports those scores to hubkit's local Hub.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hubkit.engine import Completion, SamplingParams

#: Review openings in the style of NSMC, the default model's training data.
QUICKSTART_PROMPTS: tuple[str, ...] = (
    "이 영화 정말",
    "배우들 연기가",
    "스토리가 너무",
    "오랜만에 가족들과 함께",
    "기대하고 봤는데",
    "인간처럼 생각하고, 행동하는",
)


@dataclass(frozen=True, kw_only=True)
class QuickstartResult:
    """What the quickstart produced, for callers and tests."""

    model: str
    completions: tuple[Completion, ...]
    load_seconds: float
    generate_seconds: float
    scored: Any = None  # hubkit.scoring.ScoreResult of the scoring stage, None when skipped
    published: Any = None  # hubkit.publish.PublishResult of the final stage, None when skipped

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.completions)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0


def run_quickstart(
    *,
    model: str | None = "default",
    backend: str = "auto",
    replicas: int = 1,
    address: str | None = None,
    params: SamplingParams | None = None,
    prompts: tuple[str, ...] = QUICKSTART_PROMPTS,
    score: bool = True,
    runs_dir: str | os.PathLike[str] = "runs/quickstart",
    publish: bool = True,
    dtype: str = "auto",
    compile: bool = False,
) -> QuickstartResult:
    """Runs the main job and prints what it did.

    Args:
        model: Model folder, Hub id or "default".
        backend: "auto" (default: vLLM for decoders, transformers for encoder-decoders), "vllm" or
            "transformers".
        replicas: Number of engine actors.
        address: Ray cluster address; None uses $RAY_ADDRESS or starts a local Ray.
        params: Sampling settings; defaults to temperature 0.8, top-p 0.95, top-k 50 (transformers'
            default), 48 tokens, a fixed seed.
        prompts: Korean prompts to continue.
        score: score NSMC sentiment on hubkit's shipped sample (200 reviews, 0- and 5-shot) with the same
            engines; the run folder goes to ``runs_dir/nsmc`` and the published card reports it.
        runs_dir: Folder for the scoring stage's run folder.
        publish: end by publishing the model and its card to hubkit's local Hub.
        dtype: Engine weights dtype: auto, float32, bfloat16 or float16.
        compile: vLLM engines compile the model with torch.compile (ignored by the transformers backend).
    """
    from rich.console import Console
    from rich.table import Table

    from hubkit.models import resolve_model
    from hubkit.pool import EnginePool

    console = Console()
    # top-k 50 cuts the tail where a 7M byte-level model finds lone UTF-8 lead bytes: at top-p 0.95 alone
    # 1 row in 600 (seeds 0-99) held a U+FFFD, with top-k 50 none did.
    params = (
        params or SamplingParams(temperature=0.8, top_p=0.95, top_k=50, max_tokens=48, seed=0)
    ).validate()
    path = resolve_model(model)
    from hubkit.engine import choose_backend

    backend = choose_backend(path, backend)
    console.print(
        f"[bold]hubkit quickstart[/bold]: model [cyan]{path}[/cyan], backend {backend}, {replicas} actor(s)"
    )
    t0 = time.perf_counter()
    from hubkit.engine import compile_options

    engine_options = {"dtype": dtype, **compile_options(backend, compile)}
    with EnginePool(
        path, backend=backend, replicas=replicas, address=address, engine_options=engine_options
    ) as pool:
        load_seconds = time.perf_counter() - t0
        console.print(f"engine pool ready in {load_seconds:.1f} s (weights in {pool.info()['dtype']})")
        t1 = time.perf_counter()
        completions = tuple(pool.generate(list(prompts), params, progress=True))
        generate_seconds = time.perf_counter() - t1
        result = QuickstartResult(
            model=path, completions=completions, load_seconds=load_seconds, generate_seconds=generate_seconds
        )
        table = Table(title="Korean continuations", show_lines=True)
        table.add_column("prompt", style="bold")
        table.add_column("continuation")
        table.add_column("tokens", justify="right")
        for prompt, completion in zip(prompts, completions, strict=True):
            table.add_row(prompt, completion.text.strip(), str(completion.completion_tokens))
        console.print(table)
        console.print(
            f"{result.completion_tokens} tokens in {generate_seconds:.2f} s = "
            f"[bold]{result.tokens_per_second:.1f} tokens/s[/bold] "
            f"({len(prompts)} prompts, "
            + ("batched by vLLM's continuous batching)" if backend == "vllm" else f"{backend} backend)")
        )
        # --- scoring stage: NSMC sentiment on the shipped sample, on the same engines (hubkit.scoring) ---
        if score:
            result = replace(
                result,
                scored=_score_stage(console, pool, Path(runs_dir) / "nsmc", dtype=dtype, compile=compile),
            )
    # --- final stage: publish the model with its card to the local Hub (hubkit.publish) ----------------
    if publish:
        scored = [result.scored.out] if result.scored is not None else []
        result = replace(result, published=_publish_stage(console, path, results=scored))
    name = model or "default"  # as the user named it
    console.print(
        f"next: [bold]hubkit demo {name}[/bold] opens the Gradio demos in your browser; "
        f"[bold]hubkit serve {name}[/bold] serves an OpenAI-compatible API",
        highlight=False,
    )
    return result


def _skipped(console, stage: str, exc: Exception) -> None:
    """One line saying a later stage failed and why; the stages before it already ran."""
    from rich.markup import escape

    console.print(f"[yellow]{stage} skipped:[/yellow] {escape(str(exc))}", highlight=False)


def _score_stage(console, pool, out: Path, *, dtype: str, compile: bool):
    """Scores NSMC sentiment on hubkit's shipped sample, 0- and 5-shot, and prints the metrics.

    The run folder is what ``hubkit score`` writes (predictions, metrics, report, plots). A failure is
    reported in one line and does not fail the quickstart: the generation above already ran.
    """
    from hubkit.datasets import NSMC_SAMPLE_TEST, NSMC_SAMPLE_TRAIN
    from hubkit.errors import HubkitError
    from hubkit.scoring import ScoreConfig, print_summary, run_score

    console.print(
        f"scoring NSMC sentiment on {NSMC_SAMPLE_TEST.name} (shipped with hubkit), 0- and 5-shot ..."
    )
    config = ScoreConfig(
        task="nsmc",
        data=(str(NSMC_SAMPLE_TEST),),
        fewshot_data=str(NSMC_SAMPLE_TRAIN),
        shots=(0, 5),
        split="test",
        out=str(out),
        overwrite=True,  # the quickstart's own folder: a run of another model replaces it
        dtype=dtype,  # the pool's, so that the run folder records how it was scored
        compile=compile,
    )
    try:
        scored = run_score(config, pool=pool)
    except HubkitError as exc:
        _skipped(console, "scoring", exc)
        return None
    print_summary(scored, console=console)
    return scored


def _publish_stage(console, path: str, *, results: Sequence[Path] = ()):
    """Publishes a local model folder and its card (reporting ``results``) to hubkit's local Hub; prints
    how to fetch it back.

    A failure is reported in one line and does not fail the quickstart: the generation above already ran.
    """
    from hubkit.errors import HubkitError
    from hubkit.models import DEFAULT_MODEL_DIR
    from hubkit.publish import publish

    folder = Path(path)
    if not folder.is_dir():
        console.print(f"not publishing {path}: it is a Hub id, not a local folder")
        return None
    repo_id = "hubkit/ko-nsmc-neox" if folder == DEFAULT_MODEL_DIR else f"hubkit/{folder.name}"
    console.print(f"publishing [cyan]{repo_id}[/cyan] with its card to the local Hub ...")
    try:
        published = publish(folder, repo_id, local=True, results=results)
    except HubkitError as exc:
        _skipped(console, "publish", exc)
        return None
    console.print(published.summary(), markup=False, highlight=False)
    return published
