"""Generation throughput: hubkit's pool vs bare vLLM vs batched transformers, and streaming HTTP load.

Everything runs in one process, on the same prompts, greedy, so every system writes the same tokens and
the ratios are comparable even on a noisy shared machine (bare vLLM and hubkit pools are measured
alternately, ``--rounds`` times, median kept). Two settings:

* ``length``: ``ignore_eos``, every sequence is exactly ``--max-tokens`` long (static batching's best case);
* ``eos``: every sequence ends at its end-of-text token, at most ``--eos-max-tokens`` (how generation is
  used: the KoGPT demo's max_length is 128). A padded ``generate`` batch keeps stepping until its longest
  sequence ends; vLLM's continuous batching drops finished ones. tokens/s counts the tokens written.

hubkit runs 1 and 2 engine actors; with 2, each binds its compute threads to its own core
(:func:`hubkit.pool.cpu_binding`).

    .venv/bin/python benchmarks/generation.py            # writes benchmarks/results/generation.md

``--dtype bfloat16`` runs every system in the dtype the default model ships in (this CPU multiplies it with
AMX); ``--compile`` starts every vLLM engine (bare and hubkit's) with torch.compile.

Targets (issue 2): hubkit >= 2.5x transformers at batch 64; hubkit within 10% of bare vLLM; 64 concurrent
streaming HTTP requests with zero errors.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from scoring import Precision, build_25m  # the scoring benchmark's: both benchmarks compute alike

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "ko_reviews_sample.txt"


@dataclass(frozen=True)
class Row:
    setting: str
    model: str
    system: str
    batch: str
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def korean_prompts(n: int) -> list[str]:
    """The first few words of real NSMC reviews (the repo's CC0 sample)."""
    lines = [ln.strip() for ln in SAMPLE.read_text(encoding="utf-8").splitlines() if len(ln.split()) >= 4]
    return [" ".join(ln.split()[:3]) for ln in lines[:n]]


def median_run(runs: list[tuple[int, float]]) -> tuple[int, float]:
    """The median of (tokens, seconds) runs by tokens/s."""
    return sorted(runs, key=lambda t: t[0] / t[1])[len(runs) // 2]


def bench_transformers(
    setting: str,
    model: str,
    prompts: list[str],
    params,
    batch_sizes: list[int],
    bs1_prompts: int,
    rounds: int,
    precision: Precision,
) -> list[Row]:
    """Batched transformers generate; the largest batch (the targets' reference) is timed ``rounds`` times
    and its median kept, like the engines', the others once (batch 1 is slow)."""
    from hubkit.backends.transformers import TransformersBackend

    backend = TransformersBackend(model, dtype=precision.dtype)
    backend.generate_batch(prompts[:2], params)  # warm-up
    rows = []
    for bs in batch_sizes:
        subset = prompts[:bs1_prompts] if bs == 1 else prompts
        runs = []
        for _ in range(rounds if bs == max(batch_sizes) else 1):
            t0 = time.perf_counter()
            tokens = 0
            for i in range(0, len(subset), bs):
                tokens += sum(c.completion_tokens for c in backend.generate_batch(subset[i : i + bs], params))
            runs.append((tokens, time.perf_counter() - t0))
        tokens, seconds = median_run(runs)
        rows.append(Row(setting, Path(model).name, "transformers generate", str(bs), tokens, seconds))
        print(rows[-1], flush=True)
    backend.shutdown()
    return rows


#: Quiet time before each timed round. vLLM's engine processes poll their queues for a second after
#: their last message (shm_broadcast's busy loop), so an engine that just finished still takes CPU from
#: the next system measured; hubkit's pool engines run in their actors and do not poll.
_SETTLE_S = 2.0


def bench_vllm_and_pool(
    setting: str,
    model: str,
    prompts: list[str],
    params,
    rounds: int,
    replicas: list[int],
    precision: Precision,
) -> list[Row]:
    """bare vLLM and hubkit pools of each size, measured alternately; the median round of each is kept."""
    import vllm

    from hubkit.backends.vllm import engine_process_env
    from hubkit.pool import EnginePool

    # Bare vLLM computes on the cores hubkit's single engine does (vLLM's own "auto" would use one of
    # two), so that the hubkit / bare ratio measures hubkit's own overhead.
    with engine_process_env():
        llm = vllm.LLM(model=model, **precision.engine_options(), seed=0, block_size=32)
    vparams = vllm.SamplingParams(temperature=0.0, max_tokens=params.max_tokens, ignore_eos=params.ignore_eos)
    llm.generate(prompts[:4], vparams, use_tqdm=False)
    bare: list[tuple[int, float]] = []
    ours: dict[int, list[tuple[int, float]]] = {n: [] for n in replicas}
    try:
        # One pool at a time (a local Ray has one CPU per core to give), alternating with bare vLLM so
        # that a noisy neighbour hurts every system alike.
        for n in replicas:
            pool = EnginePool(model, replicas=n, engine_options=precision.engine_options())
            try:
                pool.generate(prompts[:4], params)
                for _ in range(rounds):
                    time.sleep(_SETTLE_S)
                    t0 = time.perf_counter()
                    out = llm.generate(prompts, vparams, use_tqdm=False)
                    bare.append((sum(len(o.outputs[0].token_ids) for o in out), time.perf_counter() - t0))
                    time.sleep(_SETTLE_S)
                    t0 = time.perf_counter()
                    res = pool.generate(prompts, params)
                    ours[n].append((sum(c.completion_tokens for c in res), time.perf_counter() - t0))
            finally:
                pool.shutdown()
    finally:
        engine = llm.llm_engine
        del llm
        if hasattr(engine, "engine_core"):
            engine.engine_core.shutdown()
        gc.collect()
    name = Path(model).name
    rows = [Row(setting, name, "bare vllm.LLM.generate", str(len(prompts)), *median_run(bare))]
    for n in replicas:
        label = "1 Ray actor" if n == 1 else f"{n} Ray actors"
        rows.append(
            Row(setting, name, f"hubkit EnginePool ({label})", str(len(prompts)), *median_run(ours[n]))
        )
    for r in rows:
        print(r, flush=True)
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _stream_load(base_url: str, model_name: str, prompts: list[str], max_tokens: int) -> dict:
    import httpx

    async def one(client: httpx.AsyncClient, prompt: str) -> tuple[float, int, float]:
        t0 = time.perf_counter()
        ttft = None
        tokens = 0
        body = {
            "model": model_name,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        async with client.stream("POST", f"{base_url}/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"][0].get("text"):
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    tokens += 1
        return (ttft if ttft is not None else float("nan"), tokens, time.perf_counter() - t0)

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client, p) for p in prompts), return_exceptions=True)
        wall = time.perf_counter() - t0
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    ttfts = sorted(r[0] for r in ok)
    return {
        "requests": len(prompts),
        "errors": len(errors),
        "error_samples": errors[:3],
        "chunks": sum(r[1] for r in ok),
        "seconds": wall,
        "ttft_p50": statistics.median(ttfts) if ttfts else float("nan"),
        "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else float("nan"),
    }


def bench_http(model: str, prompts: list[str], max_tokens: int, precision: Precision) -> dict:
    from ray import serve

    from hubkit.serving import serve as hubkit_serve

    port = free_port()
    base = hubkit_serve(
        model,
        port=port,
        blocking=False,
        served_model_name="bench",
        engine_options=precision.engine_options(),
    )
    base = base.rstrip("/").removesuffix("/v1")
    asyncio.run(_stream_load(base, "bench", prompts[:4], 4))  # warm-up
    stats = asyncio.run(_stream_load(base, "bench", prompts, max_tokens))
    serve.shutdown()
    print(stats, flush=True)
    return stats


def write_table(rows: list[Row], http: dict | None, args: argparse.Namespace, out: Path) -> str:
    settings = {
        "length": f"ignore_eos, exactly {args.max_tokens} new tokens each",
        "eos": f"each sequence stops at end-of-text, at most {args.eos_max_tokens} new tokens",
    }
    lines = [
        f"Greedy, {args.prompts} Korean prompts, {args.dtype} on CPU, {os.cpu_count()} cores"
        f"{'; vLLM engines compiled (torch.compile)' if args.compile else ''}. "
        "transformers generates them in batches of the size in the batch column (batch 1: the first "
        f"{args.bs1_prompts}); vLLM and hubkit take all of them at once and batch continuously (at most 256 "
        "running sequences per engine). "
        f"Median of {args.rounds} alternating rounds for vLLM/hubkit, and of {args.rounds} runs for "
        f"transformers at batch {max(int(b) for b in args.batch_sizes.split(','))}. vLLM engines (bare "
        "and hubkit's) run Intel's OpenMP runtime (libiomp5, `hubkit.backends.vllm.openmp_preload`). "
        "Settings: "
        + "; ".join(f"`{k}` = {v}" for k, v in settings.items() if k in {r.setting for r in rows})
        + ".",
        "",
        "| setting | model | system | batch | tokens | s | tokens/s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.setting} | {r.model} | {r.system} | {r.batch} | {r.tokens} | {r.seconds:.2f} "
            f"| {r.tokens_per_second:.1f} |"
        )
    lines += [
        "",
        "| setting | model | hubkit x1 / transformers@64 | hubkit x2 / transformers@64 | hubkit x1 / bare vLLM |",
        "|---|---|---:|---:|---:|",
    ]
    for setting, model in dict.fromkeys((r.setting, r.model) for r in rows):
        get = {
            (r.system, r.batch): r.tokens_per_second for r in rows if (r.setting, r.model) == (setting, model)
        }
        one = next((v for (s, _), v in get.items() if s.endswith("(1 Ray actor)")), float("nan"))
        two = next((v for (s, _), v in get.items() if s.endswith("(2 Ray actors)")), float("nan"))
        bare = next(v for (s, _), v in get.items() if s.startswith("bare"))
        hf64 = get.get(("transformers generate", "64"), float("nan"))
        lines.append(f"| {setting} | {model} | {one / hf64:.2f}x | {two / hf64:.2f}x | {one / bare:.2f} |")
    if http:
        lines += [
            "",
            f"| HTTP streaming (hubkit serve, default model, {http['setting']}) | value |",
            "|---|---:|",
            f"| concurrent requests | {http['requests']} |",
            f"| errors | {http['errors']} |",
            f"| streamed chunks / s | {http['chunks'] / http['seconds']:.1f} |",
            f"| time to first token p50 | {http['ttft_p50'] * 1000:.0f} ms |",
            f"| time to first token p99 | {http['ttft_p99'] * 1000:.0f} ms |",
        ]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    rows_json = [asdict(r) | {"tokens_per_second": r.tokens_per_second} for r in rows]
    out.with_suffix(".json").write_text(
        json.dumps({"rows": rows_json, "http": http}, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--prompts",
        type=int,
        default=256,
        help="prompts per run: transformers takes them --batch-sizes at a time, the engines as they come",
    )
    parser.add_argument("--http-requests", type=int, default=64, help="concurrent streams in the HTTP test")
    parser.add_argument(
        "--max-tokens", type=int, default=64, help="new tokens per prompt in the `length` setting"
    )
    parser.add_argument("--eos-max-tokens", type=int, default=128, help="cap in the `eos` setting")
    parser.add_argument("--settings", default="length,eos")
    parser.add_argument("--replicas", default="1,2", help="hubkit pool sizes to measure")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument(
        "--bs1-prompts", type=int, default=16, help="prompts timed at batch size 1 (it is slow)"
    )
    parser.add_argument("--models", default="default,neox-25m")
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--compile", action="store_true", help="vLLM engines with torch.compile")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "generation.md")
    args = parser.parse_args()
    precision = Precision(args.dtype, args.compile)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from hubkit.engine import SamplingParams
    from hubkit.models import resolve_model

    settings = {
        "length": SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True),
        "eos": SamplingParams(temperature=0.0, max_tokens=args.eos_max_tokens),
    }
    replicas = [int(n) for n in args.replicas.split(",")]
    prompts = korean_prompts(args.prompts)
    default_dir = resolve_model("default")
    rows: list[Row] = []
    http = None
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for name in args.models.split(","):
            models[name] = (
                default_dir
                if name == "default"
                else build_25m(default_dir, Path(tmp) / name, special_ids=False)
            )
        for setting in args.settings.split(","):
            params = settings[setting]
            for model in models.values():
                rows += bench_vllm_and_pool(setting, model, prompts, params, args.rounds, replicas, precision)
                batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
                rows += bench_transformers(
                    setting, model, prompts, params, batch_sizes, args.bs1_prompts, args.rounds, precision
                )
        if not args.no_http:
            http = bench_http(default_dir, prompts[: args.http_requests], args.max_tokens, precision) | {
                "setting": "length"
            }
    print(write_table(rows, http, args, args.out))


if __name__ == "__main__":
    main()
