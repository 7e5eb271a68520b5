"""Byte-level T5 (the KEByT5 row): span corruption, ``train-lm --arch t5-byte``, the shipped
``ko-nsmc-byt5``, backend auto-selection, and the T5 behind the same pool and HTTP API as the decoders.

The fast part needs no Ray. The slow part runs the shipped model through the real CLI, a real Ray engine
pool and a real Ray Serve HTTP server, each compared with the transformers backend called directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import KO_SAMPLE

from hubkit.cli import main
from hubkit.engine import LoglikelihoodRequest, SamplingParams, choose_backend
from hubkit.errors import InvalidRequestError
from hubkit.training import (
    FIRST_SENTINEL_ID,
    MAX_SENTINELS,
    TrainConfig,
    byte_tokenizer,
    raw_length_for,
    span_corrupt,
    span_plan,
    train_lm,
)

BYT5_DIR = Path(__file__).resolve().parent.parent / "hubkit" / "assets" / "ko-nsmc-byt5"
SPAN_PROMPT = "배우들 <extra_id_0> 좋았다"
PROMPTS = [SPAN_PROMPT, "이 영화 <extra_id_0> 최고의 작품", "스토리가 <extra_id_0> 지루했다"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32)


def _hangul_share(text: str) -> float:
    letters = [c for c in text if not c.isspace()]
    return sum("가" <= c <= "힣" for c in letters) / max(len(letters), 1)


# ------------------------------------------------------------------------------------------------ span corruption


def test_span_plan_fits_the_input_length() -> None:
    for seq_len in (16, 64, 256, 1024):
        raw = raw_length_for(seq_len)
        assert span_plan(raw).inputs_length <= seq_len < span_plan(raw + 1).inputs_length
    plan = span_plan(297)  # t5-byte-small's training example: --seq-len 256
    assert (plan.noise_tokens, plan.spans, plan.inputs_length, plan.targets_length) == (45, 2, 255, 49)
    # ~90-byte reviews (held-out scoring) get one 14-byte span.
    assert (span_plan(90).noise_tokens, span_plan(90).spans) == (14, 1)


@pytest.mark.parametrize("length", [1, 2, 5, 40, 297, 1000])
def test_span_corruption_sentinels_lengths_and_reconstruction(length: int) -> None:
    rng = random.Random(length)
    text_ids = [rng.randrange(0xF5) + 3 for _ in range(length)]  # any bytes UTF-8 text can hold
    for seed in range(30):
        inputs, targets = span_corrupt(text_ids, rng=random.Random(seed))
        plan = span_plan(length)
        n = plan.spans
        assert (len(inputs), len(targets)) == (plan.inputs_length, plan.targets_length)
        assert inputs[-1] == targets[-1] == 1  # </s>
        sentinels = [FIRST_SENTINEL_ID - i for i in range(n + 1)]
        # Inputs hold sentinels 258, 257, ... once each in order; targets open with 258 and close with
        # the next unused sentinel.
        assert [t for t in inputs if t in sentinels] == sentinels[:n]
        assert [t for t in targets if t in sentinels] == sentinels
        assert targets[0] == FIRST_SENTINEL_ID and targets[-2] == sentinels[-1]
        # Putting each span back where its sentinel stands restores the text exactly.
        spans: dict[int, list[int]] = {}
        current = None
        for t in targets[:-2]:
            if t in sentinels:
                current = t
                spans[current] = []
            else:
                spans[current].append(t)
        restored = [x for t in inputs[:-1] for x in (spans[t] if t in sentinels else [t])]
        assert restored == text_ids
        assert sum(len(s) for s in spans.values()) == plan.noise_tokens
        assert all(spans.values()), "a span is never empty"


def test_span_corruption_sentinels_never_occur_in_utf8_text() -> None:
    # Sentinel ids are bytes 0xF5..0xFF (+3), which no UTF-8 text contains: a Korean review's ids never
    # collide with them, so a sentinel in an input always means a mask.
    text = KO_SAMPLE.read_text(encoding="utf-8")
    ids = {b + 3 for b in text.encode("utf-8")}
    assert not ids & {FIRST_SENTINEL_ID - i for i in range(MAX_SENTINELS)}


def test_span_corruption_is_seeded_and_spans_average_the_mean() -> None:
    ids = [b + 3 for b in "배우들 연기가 정말 좋았고 음악도 훌륭했다. 다시 보고 싶은 영화".encode()] * 8
    assert span_corrupt(ids, rng=random.Random(1)) == span_corrupt(ids, rng=random.Random(1))
    assert span_corrupt(ids, rng=random.Random(1)) != span_corrupt(ids, rng=random.Random(2))
    plan = span_plan(len(ids))
    assert abs(plan.noise_tokens / len(ids) - 0.15) < 0.01
    assert abs(plan.noise_tokens / plan.spans - 20) < 4


def test_byte_tokenizer_binds_extra_ids_to_byt5_sentinels() -> None:
    tok = byte_tokenizer()
    assert tok.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_1>", "<extra_id_10>"]) == [258, 257, 248]
    ids = tok(SPAN_PROMPT).input_ids
    assert ids == [*(b + 3 for b in "배우들 ".encode()), 258, *(b + 3 for b in " 좋았다".encode()), 1]
    # Sentinels decode to their names even when special tokens are skipped; text round-trips.
    assert tok.decode([258, *(b + 3 for b in "연기가".encode()), 257, 1], skip_special_tokens=True) == (
        "<extra_id_0>연기가<extra_id_1>"
    )
    text = "영화 ㅋㅋ 10점!"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


# ------------------------------------------------------------------------------------------------ training


def _train_args(out: Path, heldout: Path, *extra: str) -> list[str]:
    return [
        "train-lm", str(KO_SAMPLE), "--out", str(out), "--arch", "t5-byte", "--preset", "t5-byte-tiny",
        "--steps", "6", "--batch-size", "4", "--seq-len", "96", "--lr", "3e-3", "--warmup", "2",
        "--checkpoint-every", "3", "--eval-data", str(heldout), "--max-docs", "400", "--dtype", "float32",
        "--seed", "5", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("t5-heldout") / "heldout.txt"
    path.write_text(
        "\n".join(KO_SAMPLE.read_text(encoding="utf-8").splitlines()[-60:]) + "\n", encoding="utf-8"
    )
    return path


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory: pytest.TempPathFactory, heldout: Path) -> tuple[Path, str]:
    """A 6-step t5-byte-tiny run through the real CLI (one thread, so the resume test can compare bits)."""
    out = tmp_path_factory.mktemp("t5-run") / "tiny"
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.setattr("hubkit.training.default_threads", lambda: 1)
        assert main(_train_args(out, heldout)) == 0
    return out, buf.getvalue()


def test_train_t5_byte_writes_a_model_folder_that_reloads(t5_run: tuple[Path, str]) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    out, printed = t5_run
    assert "model folder" in printed and "span-corruption perplexity" in printed
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "generation_config.json",
                 "training.json", "train_log.jsonl"):  # fmt: skip
        assert (out / name).is_file(), name
    training = json.loads((out / "training.json").read_text(encoding="utf-8"))
    assert training["config"]["arch"] == "t5-byte" and training["steps"] == 6
    assert training["tokenizer"]["type"] == "byte-level (UTF-8 byte + 3)"
    assert training["objective"]["sentinels"][0] == 258 and training["objective"]["max_inputs_length"] <= 96
    assert (
        training["heldout"]["metric"] == "span-corruption perplexity"
        and training["heldout"]["documents"] == 60
    )
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in log if r["type"] == "train"] == [6]  # log_every 10: the last step only
    assert [r["step"] for r in log if r["type"] == "eval"] == [3, 6]
    first = next(r for r in log if r["type"] == "train")
    assert first["loss"] < 8, "an untrained byte-level T5 starts near ln(384) = 5.95, not far above"

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<extra_id_0>") == 258
    model = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["tie_word_embeddings"] is False and config["dropout_rate"] == 0.1
    # Untied as ByT5: its own LM head, saved and loaded as such.
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == training["parameters"]
    ids = tok(SPAN_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] >= 2 and gen[0, 0] == 0  # decoder starts from pad, like every T5


def test_t5_resume_continues_exactly(t5_run: tuple[Path, str], heldout: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    full, _ = t5_run
    out = tmp_path / "resumed"
    base = TrainConfig(data=KO_SAMPLE, out=out, arch="t5-byte", preset="t5-byte-tiny", steps=6, batch_size=4,
                       seq_len=96, lr=3e-3, warmup=2, checkpoint_every=3, eval_data=heldout, max_docs=400,
                       dtype="float32", seed=5, threads=1)  # fmt: skip
    first = train_lm(replace(base, stop_after=3))
    assert not first.finished and first.step == 3
    with pytest.raises(InvalidRequestError, match="--mean-span-length"):
        train_lm(replace(base, resume=True, mean_span_length=5.0))
    done = train_lm(replace(base, resume=True))
    assert done.finished and done.step == 6
    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and "lm_head.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)


def _cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("hubkit: error: ")
    return err


def test_t5_bad_settings_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    base = ["train-lm", str(KO_SAMPLE), "--out", str(tmp_path / "o"), "--arch", "t5-byte"]
    assert "drop --vocab-size" in _cli_error(capsys, [*base, "--vocab-size", "8000"])
    assert "t5-byte-small" in _cli_error(capsys, [*base, "--preset", "neox-small"])
    assert "--seq-len" in _cli_error(capsys, [*base, "--seq-len", "4096"])  # more spans than sentinels
    assert "--noise-density" in _cli_error(capsys, [*base, "--noise-density", "1.5"])
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ backend choice


def test_auto_backend_picks_transformers_for_encoder_decoders(
    t5_run: tuple[Path, str], tiny_model_dir: Path
) -> None:
    t5_dir = str(t5_run[0])
    assert choose_backend(t5_dir) == "transformers"
    assert choose_backend(str(tiny_model_dir)) == "vllm"
    assert choose_backend("default") == "vllm"
    assert choose_backend("ko-nsmc-byt5") == "transformers"
    assert choose_backend(t5_dir, "transformers") == "transformers"
    with pytest.raises(InvalidRequestError, match="--backend transformers") as info:
        choose_backend(t5_dir, "vllm")
    assert "\n" not in str(info.value) and "T5ForConditionalGeneration" in str(info.value)
    with pytest.raises(InvalidRequestError, match="'auto', 'vllm' or 'transformers'"):
        choose_backend(t5_dir, "tgi")


def test_gbst_remote_code_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hubkit.errors import ModelNotFoundError

    # What a GBST-KEByT5 folder's config.json declares: its own model type, loaded through auto_map.
    folder = tmp_path / "gbst-kebyt5"
    folder.mkdir()
    config = {
        "model_type": "gbswt5",
        "architectures": ["GBSWT5ForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_gbswt5.GBSWT5Config"},
        "is_encoder_decoder": True,
    }
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ModelNotFoundError, match="GBST") as info:
        choose_backend(str(folder))
    assert "\n" not in str(info.value) and "gbswt5" in str(info.value)
    assert "remote code" in _cli_error(capsys, ["generate", str(folder), "안녕", "--backend", "transformers"])


def test_vllm_on_a_t5_fails_in_one_line_before_ray(
    capsys: pytest.CaptureFixture[str], t5_run: tuple[Path, str]
) -> None:
    started = time.perf_counter()
    err = _cli_error(capsys, ["generate", str(t5_run[0]), SPAN_PROMPT, "--backend", "vllm"])
    assert "--backend transformers" in err
    assert time.perf_counter() - started < 20  # refused before Ray or any engine started


def test_compile_on_a_t5_fails_in_one_line_before_ray(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.perf_counter()
    for argv in (["generate", "ko-nsmc-byt5", SPAN_PROMPT], ["quickstart", "ko-nsmc-byt5"]):
        err = _cli_error(capsys, [*argv, "--compile"])
        assert "--compile is a vLLM option" in err and "drop it" in err
    assert time.perf_counter() - started < 20  # refused before Ray or any engine started


# ------------------------------------------------------------------------------------------------ the shipped model


def test_shipped_byt5_is_complete_small_and_documented() -> None:
    from hubkit.models import resolve_model

    assert resolve_model("ko-nsmc-byt5") == resolve_model("hubkit/ko-nsmc-byt5") == str(BYT5_DIR)
    files = {p.name for p in BYT5_DIR.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "generation_config.json",
                 "training.json", "train_log.jsonl", "TRAINING.md"):  # fmt: skip
        assert name in files, name
    assert "checkpoints" not in files
    assert sum(p.stat().st_size for p in BYT5_DIR.rglob("*") if p.is_file()) <= 10 * 10**6
    training = json.loads((BYT5_DIR / "training.json").read_text(encoding="utf-8"))
    notes = (BYT5_DIR / "TRAINING.md").read_text(encoding="utf-8")
    assert training["command"].startswith("hubkit train-lm ") and "--arch t5-byte" in training["command"]
    assert training["command"] in notes
    assert training["train_seconds"] <= 30 * 60
    assert f"{training['heldout']['perplexity']:.2f}" in notes


def test_shipped_byt5_fills_a_masked_span_as_documented() -> None:
    from hubkit.backends.transformers import TransformersBackend

    backend = TransformersBackend("ko-nsmc-byt5", dtype="float32")
    try:
        comp = asyncio.run(backend.generate(SPAN_PROMPT, GREEDY))
    finally:
        backend.shutdown()
    assert comp.text.startswith("<extra_id_0>") and comp.finish_reason == "stop"
    filled = comp.text.removeprefix("<extra_id_0>").split("<extra_id_1>")[0]
    assert filled.strip() and _hangul_share(filled) > 0.5, comp.text
    # The README and TRAINING.md show exactly this output.
    assert comp.text in (BYT5_DIR / "TRAINING.md").read_text(encoding="utf-8")


def test_card_of_the_byte_level_t5() -> None:
    from transformers import AutoModelForSeq2SeqLM

    from hubkit.cards import build_card

    card = build_card(BYT5_DIR, repo_id="hubkit/ko-nsmc-byt5")
    n = sum(p.numel() for p in AutoModelForSeq2SeqLM.from_pretrained(BYT5_DIR).parameters())
    assert card.hyperparameters.n_parameters == n  # the untied head counted
    assert card.hyperparameters.encoder_layers == 6 and card.hyperparameters.n_layers == 2
    text = card.text
    assert "| Tokenizer | byte-level (UTF-8 byte + 3) |" in text
    assert "6 + 2 (encoder + decoder)" in text and "span corruption" in text
    assert "AutoModelForSeq2SeqLM" in text and "AutoModelForCausalLM" not in text
    # The committed card is this card plus the NSMC run it was given.
    committed = (BYT5_DIR.parent.parent.parent / "model_cards" / "ko-nsmc-byt5" / "README.md").read_text(
        encoding="utf-8"
    )
    assert "| Tokenizer | byte-level (UTF-8 byte + 3) |" in committed and "nsmc" in committed.lower()
    assert "transformers backend" in committed


# ------------------------------------------------------------------------------------------------ engines (slow)


@pytest.fixture(scope="module")
def reference() -> dict[str, object]:
    """The transformers backend called directly: what the pool and the HTTP API must reproduce."""
    from hubkit.backends.transformers import TransformersBackend

    backend = TransformersBackend("ko-nsmc-byt5", dtype="float32")
    try:
        return {
            "greedy": [asyncio.run(backend.generate(p, GREEDY)) for p in PROMPTS],
            "ll": asyncio.run(backend.loglikelihood(LL_REQUESTS)),
        }
    finally:
        backend.shutdown()


LL_REQUESTS = [
    LoglikelihoodRequest(SPAN_PROMPT, "<extra_id_0> 연기가<extra_id_1>"),
    LoglikelihoodRequest(SPAN_PROMPT, "<extra_id_0> 음식이<extra_id_1>"),
    LoglikelihoodRequest("문장: 정말 재밌다 긍부정:", " 긍정"),
]


@pytest.fixture(scope="module")
def ray_for_module() -> Iterator[None]:
    import ray

    was_up = ray.is_initialized()
    yield
    if not was_up and ray.is_initialized():
        ray.shutdown()


@pytest.mark.slow
def test_cli_generate_fills_the_span(reference: dict[str, object]) -> None:
    """The README's example, as a user runs it (its own local Ray, the auto backend)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    hubkit_cmd = Path(sys.executable).parent / "hubkit"
    started = time.perf_counter()
    proc = subprocess.run(
        [str(hubkit_cmd), "generate", "ko-nsmc-byt5", SPAN_PROMPT, "--temperature", "0", "--max-tokens", "32",
         "--dtype", "float32"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    print(f"\n[t5] hubkit generate ko-nsmc-byt5: {time.perf_counter() - started:.1f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = SPAN_PROMPT + reference["greedy"][0].text  # type: ignore[index]
    assert proc.stdout.rstrip("\n").splitlines()[-1] == expected


@pytest.mark.slow
def test_pool_runs_the_t5_like_the_transformers_backend(
    reference: dict[str, object], ray_for_module: None
) -> None:
    from hubkit.pool import EnginePool

    started = time.perf_counter()
    with EnginePool("ko-nsmc-byt5", engine_options={"dtype": "float32"}) as pool:
        print(f"\n[t5] engine pool (transformers actor) ready in {time.perf_counter() - started:.1f} s")
        assert pool.backend == "transformers" and pool.info()["backend"] == "transformers"
        got = pool.generate(PROMPTS, GREEDY)
        assert [c.text for c in got] == [c.text for c in reference["greedy"]]  # type: ignore[attr-defined]
        assert [c.token_ids for c in got] == [c.token_ids for c in reference["greedy"]]  # type: ignore[attr-defined]
        chunks = list(pool.stream(SPAN_PROMPT, GREEDY))
        assert "".join(c.delta for c in chunks) == got[0].text
        scores = pool.loglikelihood(LL_REQUESTS)
        for g, w in zip(scores, reference["ll"], strict=True):  # type: ignore[call-overload]
            assert g.logprob == pytest.approx(w.logprob, abs=1e-4)
            assert (g.is_greedy, g.num_tokens) == (w.is_greedy, w.num_tokens)
        assert scores[0].logprob != scores[1].logprob
        with pytest.raises(InvalidRequestError, match="prompt is empty"):
            pool.generate(["  "], GREEDY)
        assert pool.generate([SPAN_PROMPT], GREEDY)[0].text == got[0].text  # still serving
    with pytest.raises(InvalidRequestError, match="--backend transformers"):
        EnginePool("ko-nsmc-byt5", backend="vllm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_http_api_answers_completions_for_the_t5(reference: dict[str, object], ray_for_module: None) -> None:
    import openai
    from ray import serve as ray_serve

    from hubkit.models import resolve_model
    from hubkit.serving import serve, shutdown

    lines: list[str] = []
    started = time.perf_counter()
    url = serve(resolve_model("ko-nsmc-byt5"), port=_free_port(), served_model_name="ko-nsmc-byt5",
                engine_options={"dtype": "float32"}, blocking=False, print_fn=lines.append)  # fmt: skip
    print(f"\n[t5] HTTP server up in {time.perf_counter() - started:.1f} s")
    try:
        assert "(transformers, 1 engine actor(s))" in lines[0]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["ko-nsmc-byt5"]
        want = reference["greedy"][0]  # type: ignore[index]
        out = client.completions.create(
            model="ko-nsmc-byt5", prompt=SPAN_PROMPT, max_tokens=32, temperature=0
        )
        assert out.choices[0].text == want.text
        assert out.choices[0].finish_reason == want.finish_reason == "stop"
        assert (
            out.usage.prompt_tokens == len(SPAN_PROMPT.encode()) - len("<extra_id_0>") + 1 + 1
        )  # bytes, 258, </s>
        assert out.usage.completion_tokens == len(want.token_ids)
        stream = client.completions.create(model="ko-nsmc-byt5", prompt=SPAN_PROMPT, max_tokens=32,
                                           temperature=0, stream=True)  # fmt: skip
        assert "".join(c.choices[0].text for c in stream if c.choices) == want.text
        with pytest.raises(openai.BadRequestError, match="prompt is empty"):
            client.completions.create(model="ko-nsmc-byt5", prompt="", max_tokens=4)
        again = client.completions.create(
            model="ko-nsmc-byt5", prompt=SPAN_PROMPT, max_tokens=32, temperature=0
        )
        assert again.choices[0].text == want.text
    finally:
        shutdown()
        ray_serve.shutdown()
