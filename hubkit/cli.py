"""The ``hubkit`` command. Thin: parses arguments and calls into hubkit; heavy imports stay inside commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from hubkit.errors import HubkitError


def _add_adapter_arg(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument(
        "--adapter",
        default=None,
        help=f"PEFT prompt-tuning folder (`hubkit tune`) whose soft prompt goes before every input to MODEL{note}",
    )


def _add_engine_args(p: argparse.ArgumentParser, *, model_positional: bool = True) -> None:
    if model_positional:
        p.add_argument(
            "model",
            nargs="?",
            default="default",
            help="model folder, Hub id, or 'default' (the embedded Korean model)",
        )
    p.add_argument(
        "--backend",
        choices=["auto", "vllm", "transformers"],
        default="auto",
        help="engine backend (default auto: transformers for encoder-decoders like byte-level T5, else vllm)",
    )
    p.add_argument("--replicas", type=int, default=1, help="number of Ray engine actors")
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray started for you)",
    )
    p.add_argument(
        "--dtype", default="auto", help="weights dtype in the engine: auto, float32, bfloat16, float16"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="vLLM engines compile the model with torch.compile: a slower first start, faster steps",
    )


def _add_sampling_args(p: argparse.ArgumentParser, *, max_tokens: int = 64, temperature: float = 0.8) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hubkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "quickstart",
        help="start Ray, load the default model into vLLM, generate Korean text, score NSMC, publish with a card",
    )
    _add_engine_args(p)
    _add_sampling_args(p, max_tokens=48)
    p.add_argument(
        "--no-score",
        action="store_true",
        help="skip scoring NSMC on the shipped sample (runs/quickstart/nsmc)",
    )

    p = sub.add_parser("generate", help="print a completion of PROMPT")
    p.add_argument("model")
    p.add_argument("prompt")
    _add_engine_args(p, model_positional=False)
    _add_sampling_args(p)
    p.add_argument(
        "--no-stream", action="store_true", help="print the completion at the end, not as it comes"
    )
    _add_adapter_arg(p)

    p = sub.add_parser(
        "chat", help="interactive prompt loop (prompt, temperature, max_length), like KoGPT's demo"
    )
    _add_engine_args(p)
    _add_adapter_arg(p)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API on Ray Serve")
    _add_engine_args(p)
    _add_adapter_arg(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--served-model-name", default=None, help="name clients use in 'model' (default: folder name)"
    )

    p = sub.add_parser(
        "train-lm",
        help="train a byte-level BPE tokenizer and a small GPT-NeoX on Korean text "
        "(--arch t5-byte: a byte-level T5 with span corruption)",
    )
    p.add_argument(
        "data", type=Path, help="plain text (one document per line) or NSMC .txt/.tsv (id, document, label)"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="output folder (a Hugging Face model folder at the end)"
    )
    p.add_argument(
        "--arch",
        choices=["neox", "t5-byte"],
        default="neox",
        help="neox: decoder, next-token loss (default); t5-byte: ByT5-style T5, span corruption",
    )
    p.add_argument(
        "--preset",
        default=None,
        help="model preset (see `hubkit presets`; default neox-small, or t5-byte-small with --arch t5-byte)",
    )
    p.add_argument(
        "--vocab-size", type=int, default=None, help="BPE vocabulary (default 8000; not for t5-byte)"
    )
    p.add_argument("--noise-density", type=float, default=0.15, help="t5-byte: fraction of bytes masked")
    p.add_argument("--mean-span-length", type=float, default=20.0, help="t5-byte: mean masked span in bytes")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--seq-len", type=int, default=128, help="tokens per sequence (t5-byte: encoder input bytes)"
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default 1e-3 AdamW; t5-byte: 1e-2 Adafactor, as T5)",
    )
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--eval-data", type=Path, default=None, help="held-out documents for perplexity")
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the saved weights",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the idle CPUs)")

    p = sub.add_parser("presets", help="list model presets with their parameter counts")

    p = sub.add_parser("hub", help="local Hugging Face Hub server: hubkit's default publish target")
    hub_sub = p.add_subparsers(dest="hub_command", required=True)
    hp = hub_sub.add_parser(
        "serve", help="serve a Hub-compatible API (clients: HF_ENDPOINT=URL HF_HUB_DISABLE_XET=1)"
    )
    hp.add_argument("--root", type=Path, required=True, help="storage folder (repos, objects, tokens.json)")
    hp.add_argument("--host", default="127.0.0.1")
    hp.add_argument("--port", type=int, default=8500)
    hp.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="also accept the token on this file's first line (default: tokens in ROOT/tokens.json)",
    )
    hp.add_argument("--user", default="hubkit", help="user the --token-file token authenticates as")
    hp.add_argument(
        "--lfs-threshold",
        type=int,
        default=5 * 1024 * 1024,
        help="files larger than this many bytes are uploaded through LFS",
    )
    hp = hub_sub.add_parser(
        "token", help="create an access token for the local Hub and print it (shown once)"
    )
    hp.add_argument("--root", type=Path, required=True, help="storage folder of the local Hub")
    hp.add_argument(
        "--user", default="hubkit", help="user the token authenticates as (whoami, default namespace)"
    )
    hp.add_argument("--role", choices=["write", "read"], default="write")
    hp.add_argument("--name", default="cli", help="label shown by whoami")
    hp.add_argument(
        "--token-file", type=Path, default=None, help="also write the token to this file (mode 0600)"
    )
    _add_card_publish_parsers(sub)
    _add_score_parser(sub)
    _add_demo_parser(sub)
    _add_tune_parser(sub)
    return parser


def _sampling(args: argparse.Namespace):
    from hubkit.engine import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop),
        seed=args.seed,
    )


def _check_compile(args: argparse.Namespace) -> None:
    """Refuses --compile for a model vLLM does not run, before Ray starts."""
    from hubkit.engine import choose_backend

    if args.compile and choose_backend(args.model, args.backend) != "vllm":
        from hubkit.errors import InvalidRequestError

        raise InvalidRequestError(f"--compile is a vLLM option; {args.model} runs on transformers: drop it")


def _engine_options(args: argparse.Namespace) -> dict[str, object]:
    from hubkit.engine import compile_options

    _check_compile(args)
    return {"dtype": args.dtype, **compile_options("vllm", args.compile)}


def _pool(args: argparse.Namespace):
    from hubkit.models import resolve_model

    model = resolve_model(args.model)  # fail fast on a bad path, before Ray starts
    from hubkit.pool import EnginePool

    return EnginePool(
        model,
        backend=args.backend,
        replicas=args.replicas,
        address=args.address,
        engine_options=_engine_options(args),
        adapter=getattr(args, "adapter", None),
    )


def cmd_quickstart(args: argparse.Namespace) -> int:
    from hubkit.quickstart import run_quickstart

    _check_compile(args)
    run_quickstart(
        model=args.model,
        backend=args.backend,
        replicas=args.replicas,
        address=args.address,
        params=_sampling(args),
        score=not args.no_score,
        dtype=args.dtype,
        compile=args.compile,
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling(args).validate()
    with _pool(args) as pool:
        if args.no_stream:
            print(args.prompt + pool.generate([args.prompt], params)[0].text)
        else:
            print(args.prompt, end="", flush=True)
            for chunk in pool.stream(args.prompt, params):
                print(chunk.delta, end="", flush=True)
            print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from hubkit.chat import chat_loop

    with _pool(args) as pool:
        chat_loop(pool)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from hubkit.models import resolve_model
    from hubkit.serving import serve

    serve(
        resolve_model(args.model),
        backend=args.backend,
        replicas=args.replicas,
        address=args.address,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        engine_options=_engine_options(args),
        adapter=args.adapter,
    )
    return 0


def cmd_train_lm(args: argparse.Namespace) -> int:
    from hubkit.training import TrainConfig, train_lm

    config = TrainConfig(
        data=args.data,
        out=args.out,
        preset=args.preset,
        vocab_size=args.vocab_size,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup=args.warmup,
        checkpoint_every=args.checkpoint_every,
        eval_data=args.eval_data,
        max_docs=args.max_docs,
        dtype=args.dtype,
        seed=args.seed,
        resume=args.resume,
        arch=args.arch,
        noise_density=args.noise_density,
        mean_span_length=args.mean_span_length,
        threads=args.threads,
    )
    result = train_lm(config)
    print(result.summary())
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from hubkit.presets import PRESETS, count_parameters

    print(f"{'preset':<22} {'family':<9} {'parameters':>15}  seed model")
    for name, preset in PRESETS.items():
        print(f"{name:<22} {preset.family:<9} {count_parameters(name):>15,}  {preset.seed_model or '-'}")
    return 0


def cmd_hub(args: argparse.Namespace) -> int:
    if args.hub_command == "token":
        from hubkit.hubstore import create_token

        print(
            create_token(
                args.root, user=args.user, role=args.role, name=args.name, token_file=args.token_file
            )
        )
        return 0
    from hubkit.hubserver import serve_hub

    serve_hub(
        args.root,
        host=args.host,
        port=args.port,
        token_file=args.token_file,
        user=args.user,
        lfs_threshold=args.lfs_threshold,
    )
    return 0


# --------------------------------------------------------------------------------------------- card, publish


def _add_card_publish_parsers(sub) -> None:
    p = sub.add_parser(
        "card", help="write a model card (README.md + plots/) from a model folder, runs and a train log"
    )
    p.add_argument(
        "model_dir", nargs="?", default=None, help="model folder (or 'default'); omit with --preset"
    )
    p.add_argument("--preset", default=None, help="card of a preset's architecture (no weights needed)")
    p.add_argument(
        "--results", type=Path, action="append", default=[], help="scoring run folder (repeatable)"
    )
    p.add_argument("--train-log", type=Path, default=None, help="train_log.jsonl (default: MODEL_DIR's)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for README.md and plots/ (default: MODEL_DIR; with --preset only: print the card)",
    )
    p.add_argument("--stdout", action="store_true", help="print the card instead of writing it")
    p.add_argument("--repo-id", default=None, help="Hub id the usage snippets load")
    p.add_argument("--revision", default=None, help="branch the usage snippets load")
    p.add_argument("--license", default="apache-2.0")
    p.add_argument(
        "--dataset", action="append", default=None, help="dataset id for the metadata (repeatable)"
    )
    p.add_argument("--base-model", default=None)
    p.add_argument("--tag", action="append", default=[], help="extra metadata tag (repeatable)")
    p.add_argument("--depth", type=int, default=3, help="depth of the per-module parameter table")

    p = sub.add_parser("publish", help="push a model folder, its card and plots to a Hub repo in one commit")
    p.add_argument("model_dir", help="model folder (or 'default')")
    p.add_argument("repo_id", help="namespace/name")
    p.add_argument(
        "--revision", default=None, help="branch, created when new (e.g. KoGPT6B-ryan1.5b-float16)"
    )
    p.add_argument("--tag", default=None, help="tag for the new commit")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float16", "bfloat16", "float32"],
        help="publish a copy of the weights in this dtype",
    )
    p.add_argument("--space", type=Path, default=None, help="also publish this Space folder (spaces/NAME)")
    p.add_argument("--space-id", default=None, help="the Space's repo id (default: NAMESPACE/folder name)")
    p.add_argument(
        "--results", type=Path, action="append", default=[], help="scoring run folder for the card"
    )
    p.add_argument(
        "--endpoint",
        default=None,
        help="Hub URL (default: $HF_ENDPOINT, else hubkit's local Hub); the token comes from $HF_TOKEN",
    )
    p.add_argument("--private", action="store_true")
    p.add_argument(
        "--no-card", action="store_true", help="upload the folder's own README.md instead of a card"
    )
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--dry-run", action="store_true", help="list what would be sent; contact no Hub")


def cmd_card(args: argparse.Namespace) -> int:
    from hubkit.cards import build_card
    from hubkit.models import resolve_model

    if args.model_dir is not None and (Path(args.model_dir) / "adapter_config.json").is_file():
        model_dir = str(Path(args.model_dir).resolve())  # a `hubkit tune` adapter folder: no config.json
    else:
        model_dir = resolve_model(args.model_dir) if args.model_dir is not None else None
    out = None if args.stdout else (args.out or model_dir)
    result = build_card(
        model_dir,
        preset=args.preset,
        results=args.results,
        train_log=args.train_log,
        out_dir=out,
        repo_id=args.repo_id,
        revision=args.revision,
        license=args.license,
        datasets=args.dataset,
        base_model=args.base_model,
        tags=args.tag,
        depth=args.depth,
    )
    if result.path is None:
        print(result.text, end="")
    else:
        print(f"wrote {result.path}" + (f" and {len(result.plots)} plots" if result.plots else ""))
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from hubkit.publish import publish

    result = publish(
        args.model_dir,
        args.repo_id,
        revision=args.revision,
        tag=args.tag,
        dtype=args.dtype,
        space_dir=args.space,
        space_id=args.space_id,
        endpoint=args.endpoint,
        private=args.private,
        dry_run=args.dry_run,
        card=not args.no_card,
        results=args.results,
        commit_message=args.message,
    )
    print(result.summary())
    return 0


# --------------------------------------------------------------------------------------------- score


def _add_score_parser(sub) -> None:
    # Every option defaults to None: a value given on the command line wins over the --config file's.
    p = sub.add_parser(
        "score", help="score a task (nsmc, kobest_*, perplexity, a task YAML) on data files with Ray"
    )
    p.add_argument(
        "model", nargs="?", default=None, help="model folder, Hub id, or 'default' (default: default)"
    )
    p.add_argument("--config", type=Path, default=None, help="job YAML with the same fields as these flags")
    _add_adapter_arg(p)
    p.add_argument(
        "--task", default=None, help="built-in task (nsmc, kobest_boolq, ..., perplexity) or task YAML"
    )
    p.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="data files or folders (.txt/.tsv NSMC, .csv, .jsonl, .parquet)",
    )
    p.add_argument(
        "--out", default=None, help="run folder (rerun the same command to resume an interrupted job)"
    )
    p.add_argument("--shots", default=None, help="n-shot grid, e.g. 0,5,10,50 (default: 0)")
    p.add_argument("--fewshot-data", default=None, help="labelled file the few-shot examples come from")
    p.add_argument("--seed", type=int, default=None, help="few-shot seed (default: the task's, 1234)")
    p.add_argument(
        "--columns",
        action="append",
        default=None,
        help="task_field=column pairs for other schemas, e.g. document=review,label=sentiment",
    )
    p.add_argument(
        "--format",
        default=None,
        choices=["tsv", "csv", "jsonl", "parquet"],
        help="data format when the extension does not say",
    )
    p.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    p.add_argument("--split", default=None, help="name of the data split for reports and cards, e.g. test")
    p.add_argument(
        "--backend",
        choices=["auto", "vllm", "transformers"],
        default=None,
        help="engine backend (default auto: transformers for encoder-decoders like byte-level T5, else vllm)",
    )
    p.add_argument("--replicas", type=int, default=None, help="engine actors (default: 1)")
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray started for you)",
    )
    p.add_argument(
        "--dtype", default=None, help="weights dtype in the engine: auto, float32, bfloat16, float16"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="vLLM engines compile the model with torch.compile: a slower first start, faster steps",
    )
    p.add_argument("--num-cpus", type=float, default=None, help="Ray CPUs per engine actor (default: 1)")
    p.add_argument("--batch-rows", type=int, default=None, help="rows per saved shard (default: 128)")
    p.add_argument(
        "--max-inflight", type=int, default=None, help="batches scored at once (default: 2 per replica)"
    )
    p.add_argument(
        "--overwrite", action="store_true", default=None, help="replace a run folder holding another job"
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=None,
        help="no progress bar or status lines",
    )


def cmd_score(args: argparse.Namespace) -> int:
    from hubkit.datasets import parse_columns
    from hubkit.scoring import ScoreConfig, load_config, print_summary, run_score

    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("command", "config")}
    if "columns" in given:
        given["columns"] = parse_columns(given["columns"])
    config = load_config(args.config, given) if args.config else ScoreConfig.from_mapping(given)
    print_summary(run_score(config))
    return 0


# --------------------------------------------------------------------------------------------- demo


def _add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="Gradio demos (generate, sentiment, compare, results) on 127.0.0.1")
    _add_engine_args(p)
    p.add_argument(
        "--demo",
        default="all",
        choices=["all", "generate", "sentiment", "compare", "results"],
        help="one demo, or all of them in tabs (default)",
    )
    p.add_argument(
        "--endpoint",
        default=None,
        help="URL of a running `hubkit serve` to use instead of loading MODEL (default: $HUBKIT_ENDPOINT)",
    )
    p.add_argument("--compare-model", default=None, help="second model for the compare demo")
    _add_adapter_arg(p, note=" (not to --compare-model; default: $HUBKIT_ADAPTER)")
    p.add_argument("--compare-endpoint", default=None, help="second server for the compare demo")
    p.add_argument(
        "--runs",
        type=Path,
        default=None,
        help="folder of `hubkit score` runs (default: $HUBKIT_RUNS or runs)",
    )
    p.add_argument("--host", default=None, help="interface (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    p.add_argument(
        "--no-privacy-filter",
        action="store_true",
        help="start with the filter that masks phone/RRN/account numbers switched off",
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from hubkit.demo import run_demo

    run_demo(
        args.demo,
        model=args.model,
        adapter=args.adapter,
        endpoint=args.endpoint,
        compare_model=args.compare_model,
        compare_endpoint=args.compare_endpoint,
        runs_dir=args.runs,
        backend=args.backend,
        replicas=args.replicas,
        address=args.address,
        engine_options={"dtype": args.dtype} if args.dtype != "auto" else None,
        host=args.host,
        port=args.port,
        privacy_filter=not args.no_privacy_filter,
    )
    return 0


# --------------------------------------------------------------------------------------------- tune


def _add_tune_parser(sub) -> None:
    from hubkit.tuning import DEFAULT_LR

    p = sub.add_parser(
        "tune", help="prompt tuning (a soft prompt on the frozen model) or full fine-tuning for a task"
    )
    p.add_argument("model", nargs="?", default="default", help="base model folder, Hub id, or 'default'")
    p.add_argument(
        "--method",
        choices=["prompt", "full"],
        default="prompt",
        help="prompt: train N virtual tokens, the model frozen (PEFT format); full: train every weight",
    )
    p.add_argument(
        "--task", default="nsmc", help="built-in task (nsmc, kobest_*) or task YAML: prompt and choices"
    )
    p.add_argument(
        "--train",
        type=Path,
        required=True,
        help="labelled training data (.txt/.tsv NSMC, .csv, .jsonl, .parquet)",
    )
    p.add_argument(
        "--eval",
        type=Path,
        default=None,
        help="labelled data for periodic evaluation, early stopping and the final predictions",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="run folder, the adapter/model folder at the end (rerun the same command to resume)",
    )
    p.add_argument("--num-virtual-tokens", type=int, default=50, help="soft-prompt length (prompt method)")
    p.add_argument(
        "--init",
        choices=["examples", "vocab", "random", "text"],
        default="examples",
        help="soft-prompt init: task examples from --train (a few-shot prompt), vocabulary embeddings, "
        "random, or --init-text",
    )
    p.add_argument(
        "--init-text", default=None, help="text whose embeddings start the soft prompt (--init text)"
    )
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"peak AdamW learning rate (default: {DEFAULT_LR['prompt']} prompt, {DEFAULT_LR['full']} full)",
    )
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=None, help="default: 0 prompt, 0.01 full")
    p.add_argument("--eval-every", type=int, default=200, help="steps between evaluations and checkpoints")
    p.add_argument("--eval-rows", type=int, default=1000, help="eval rows used at each periodic evaluation")
    p.add_argument(
        "--patience", type=int, default=5, help="evaluations without improvement before stopping (0: never)"
    )
    p.add_argument("--limit", type=int, default=None, help="use only the first N training rows")
    p.add_argument(
        "--columns",
        action="append",
        default=None,
        help="task_field=column pairs for other schemas, e.g. document=review,label=sentiment",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the idle CPUs)")
    p.add_argument("--no-card", dest="card", action="store_false", help="do not write README.md and plots/")
    p.add_argument("--overwrite", action="store_true", help="replace a different run found in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def cmd_tune(args: argparse.Namespace) -> int:
    from hubkit.datasets import parse_columns
    from hubkit.tuning import TuneConfig, tune

    config = TuneConfig(
        model=args.model,
        method=args.method,
        task=args.task,
        train=args.train,
        eval=args.eval,
        out=args.out,
        num_virtual_tokens=args.num_virtual_tokens,
        init=args.init,
        init_text=args.init_text,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        eval_every=args.eval_every,
        eval_rows=args.eval_rows,
        patience=args.patience,
        limit=args.limit,
        columns=parse_columns(args.columns),
        seed=args.seed,
        threads=args.threads,
        card=args.card,
        overwrite=args.overwrite,
        progress=args.progress,
    )
    print(tune(config).summary())
    return 0


COMMANDS = {
    "quickstart": cmd_quickstart,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "serve": cmd_serve,
    "train-lm": cmd_train_lm,
    "presets": cmd_presets,
    "hub": cmd_hub,
    "card": cmd_card,
    "publish": cmd_publish,
    "score": cmd_score,
    "demo": cmd_demo,
    "tune": cmd_tune,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except HubkitError as exc:
        # One line that names the fix; no traceback for mistakes a user can correct.
        print(f"hubkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hubkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
