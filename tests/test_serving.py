"""The OpenAI-compatible HTTP API, end to end: real Ray Serve, real vLLM, the official ``openai`` client.

Two servers share the module and boot concurrently (each engine start costs ~30 s on 2 cores):

* ``server``: in-process ``serve(..., blocking=False)`` on a copy of the tiny model given a chat template.
* ``cli_server``: the real ``hubkit serve`` command in a subprocess (its own local Ray) on the tiny model
  as saved, i.e. without a chat template; it answers the "no chat template" 400 and the Ctrl-C test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from hubkit.engine import SamplingParams

pytestmark = pytest.mark.slow

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
PROMPT = "이 영화 정말"
SERVED = "tiny-chat"
CLI_SERVED = "tiny-plain"
START_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`hubkit serve` exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        # Ready when the command says so (it prints after Serve reports the app RUNNING) and answers.
        if "press Ctrl-C to stop" in log.read_text(errors="replace"):
            assert httpx.get(f"{url}/health", timeout=30).status_code == 200
            return
        time.sleep(1)
    pytest.fail(f"`hubkit serve` was not ready in {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


@dataclass
class CliServer:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a simple chat template added to its tokenizer_config.json."""
    out = tmp_path_factory.mktemp("tiny-neox-chat")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, ensure_ascii=False))
    return out


@pytest.fixture(scope="module")
def cli_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliServer]:
    """``hubkit serve`` as a user runs it. Started before ``server`` so that both boot at once."""
    port = _free_port()
    log = tmp_path_factory.mktemp("cli-serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    hubkit_cmd = Path(sys.executable).parent / "hubkit"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(hubkit_cmd), "serve", str(tiny_model_dir), "--port", str(port), "--dtype", "float32",
             "--served-model-name", CLI_SERVED],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    server = CliServer(url=f"http://127.0.0.1:{port}", proc=proc, log=log)
    yield server
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def server(chat_model_dir: Path, cli_server: CliServer) -> Iterator[str]:
    import ray
    from ray import serve as ray_serve

    from hubkit.serving import serve, shutdown

    ray_was_up = ray.is_initialized()
    lines: list[str] = []
    t0 = time.perf_counter()
    url = serve(str(chat_model_dir), port=_free_port(), served_model_name=SERVED,
                engine_options={"dtype": "float32"}, blocking=False, print_fn=lines.append)  # fmt: skip
    print(f"in-process server up in {time.perf_counter() - t0:.1f} s")
    assert any("curl" in line and f"{url}/v1/completions" in line for line in lines), lines
    yield url
    t0 = time.perf_counter()
    shutdown()
    ray_serve.shutdown()
    if not ray_was_up:
        ray.shutdown()
    print(f"in-process server stopped in {time.perf_counter() - t0:.1f} s")


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


def _greedy(client: openai.OpenAI, prompt: str = PROMPT, max_tokens: int = 12, model: str = SERVED) -> str:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return out.choices[0].text


def _still_serves(client: openai.OpenAI, model: str = SERVED) -> bool:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0)
    return out.usage is not None and out.usage.completion_tokens == 4


def test_models_and_health(server: str, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [SERVED]
    health = httpx.get(f"{server}/health", timeout=30)
    assert health.status_code == 200
    assert health.json()["alive_actors"] >= 1


def test_completion_equals_pool_greedy(client: openai.OpenAI) -> None:
    from ray import serve as ray_serve

    from hubkit.serving import APP_NAME

    out = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=12, temperature=0)
    # The pool the server holds, called through a Serve handle instead of HTTP.
    params = SamplingParams(temperature=0.0, max_tokens=12)
    ref = ray_serve.get_app_handle(APP_NAME).generate.remote(PROMPT, params).result(timeout_s=120)
    assert out.choices[0].text == ref.text
    assert out.choices[0].text.strip(), "greedy continuation is empty"
    assert out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.completion_tokens == len(ref.token_ids)
    assert out.usage.prompt_tokens == ref.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    # A list of prompts: one choice per prompt, in order; the first equals the single-prompt answer.
    both = client.completions.create(
        model=SERVED, prompt=[PROMPT, "배우들 연기가"], max_tokens=12, temperature=0
    )
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == ref.text
    assert both.choices[1].text != ref.text


def test_streaming_completion_joins_to_greedy_text(client: openai.OpenAI) -> None:
    expected = _greedy(client, max_tokens=24)
    stream = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 1, "expected several chunks"
    assert "".join(texts) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_sampling_parameters_are_applied(client: openai.OpenAI) -> None:
    seeded = [client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=7,
                                        extra_body={"top_k": 50}).choices[0].text for _ in range(2)]  # fmt: skip
    assert seeded[0] == seeded[1], "the same seed must give the same text"
    greedy = _greedy(client, max_tokens=16)
    stop = greedy[3:6]
    assert stop.strip()
    out = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert out.choices[0].text == greedy[: greedy.index(stop)]
    assert out.choices[0].finish_reason == "stop"


BAD_COMPLETIONS = [
    pytest.param({"prompt": ""}, "prompt is empty", id="empty-prompt"),
    pytest.param({"prompt": "가나다 " * 400}, "context", id="prompt-too-long"),
    pytest.param({"max_tokens": 0}, "max_tokens must be a positive integer", id="max-tokens-0"),
    pytest.param({"max_tokens": 100_000}, "above this model's limit", id="max-tokens-too-big"),
    pytest.param({"temperature": -0.5}, "temperature must be >= 0", id="negative-temperature"),
    pytest.param({"n": 2}, "only n=1", id="n-2"),
    pytest.param({"prompt": [1, 2, 3]}, "token ids are not supported", id="token-ids"),
    pytest.param({"max_tokens": "many"}, "max_tokens", id="pydantic-type-error"),
    pytest.param({"max_tokens": 0, "stream": True}, "max_tokens", id="streaming-max-tokens-0"),
    pytest.param({"prompt": "", "stream": True}, "prompt is empty", id="streaming-empty-prompt"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_COMPLETIONS)
def test_bad_completion_is_400_and_next_request_works(
    client: openai.OpenAI, overrides: dict[str, object], message: str
) -> None:
    kwargs: dict[str, object] = {"model": SERVED, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    kwargs.update(overrides)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**kwargs)  # type: ignore[call-overload]
    assert message in info.value.message
    error = info.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"
    assert "Traceback" not in info.value.message and "\n" not in error["message"]
    assert _still_serves(client)


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=4)
    assert "gpt-4o" in info.value.message and SERVED in info.value.message
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert _still_serves(client)


def test_raw_http_errors_and_sse_framing(server: str) -> None:
    bad_json = httpx.post(f"{server}/v1/completions", content=b"{not json", timeout=30,
                          headers={"Content-Type": "application/json"})  # fmt: skip
    assert bad_json.status_code == 400
    assert set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
    missing = httpx.get(f"{server}/v1/nope", timeout=30)
    assert missing.status_code == 404 and "error" in missing.json()

    body = {"model": SERVED, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert first["object"] == "text_completion" and first["model"] == SERVED


def _render(messages: list[dict[str, str]]) -> str:
    import jinja2

    return jinja2.Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)


def test_chat_completion_applies_the_template(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "짧게 답하세요."},
        {"role": "user", "content": "이 영화 어때요?"},
    ]
    expected = _greedy(client, prompt=_render(messages), max_tokens=10)
    out = client.chat.completions.create(model=SERVED, messages=messages, max_tokens=10, temperature=0)  # type: ignore[arg-type]
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected
    assert out.usage is not None and out.usage.completion_tokens > 0

    stream = client.chat.completions.create(model=SERVED, messages=messages, max_tokens=10, temperature=0,  # type: ignore[arg-type]
                                            stream=True)  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")

    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=SERVED, messages=messages, max_tokens=-1)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=SERVED, messages=[])
    assert client.chat.completions.create(model=SERVED, messages=messages, max_tokens=2).choices  # type: ignore[arg-type]


def test_cli_serve_answers_then_stops_on_ctrl_c(cli_server: CliServer, client: openai.OpenAI) -> None:
    _wait_ready(cli_server.url, cli_server.proc, cli_server.log)
    cli = openai.OpenAI(base_url=f"{cli_server.url}/v1", api_key="none", max_retries=0, timeout=120)
    assert [m.id for m in cli.models.list().data] == [CLI_SERVED]
    # Same weights, another engine in another Ray: the greedy text must agree with the in-process server.
    assert _greedy(cli, model=CLI_SERVED) == _greedy(client)
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        cli.chat.completions.create(model=CLI_SERVED, messages=[{"role": "user", "content": "안녕"}])
    assert _still_serves(cli, CLI_SERVED)

    os.killpg(cli_server.proc.pid, signal.SIGINT)
    t0 = time.perf_counter()
    assert cli_server.proc.wait(timeout=90) == 0
    print(f"`hubkit serve` stopped {time.perf_counter() - t0:.1f} s after Ctrl-C")
    log = cli_server.log.read_text()
    assert f"{cli_server.url}/v1" in log and "curl" in log and "shutting down" in log
    assert "Traceback" not in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{cli_server.url}/health", timeout=5)


# ----------------------------------------------------------------------------------------------------------
# Log-likelihoods over HTTP: hubkit's /v1/loglikelihood, OpenAI's legacy echo form (lm-eval's
# local-completions), and the sentiment Space scoring through the server.

PAIRS = [
    ("문장: 정말 재미있고 감동적인 영화였어요 긍부정:", " 긍정"),
    ("문장: 정말 재미있고 감동적인 영화였어요 긍부정:", " 부정"),
    ("이 영화 정말", " 지루하고 뻔하다"),
    ("배우들 연기가 ", "좋았다"),  # trailing space: lm-eval moves it onto the continuation
    ("", "배우들 연기가 좋았다"),  # empty context: scored after the prefix token
]
REVIEWS = ["정말 재미있고 감동적인 영화였어요", "시간 낭비였다 너무 지루하다", "배우들 연기가 좋았다"]


def _pool_loglikelihood(pairs: list[tuple[str, str]]) -> list[Any]:
    """The server's own pool, called through a Serve handle instead of HTTP."""
    from ray import serve as ray_serve

    from hubkit.engine import LoglikelihoodRequest
    from hubkit.serving import APP_NAME

    requests = [LoglikelihoodRequest(c, k) for c, k in pairs]
    return ray_serve.get_app_handle(APP_NAME).loglikelihood.remote(requests).result(timeout_s=120)


def test_loglikelihood_route_equals_the_pool(server: str) -> None:
    body = {"model": SERVED, "requests": [{"context": c, "continuation": k} for c, k in PAIRS]}
    response = httpx.post(f"{server}/v1/loglikelihood", json=body, timeout=120)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["object"] == "list" and out["model"] == SERVED
    assert [d["index"] for d in out["data"]] == list(range(len(PAIRS)))
    ref = _pool_loglikelihood(PAIRS)
    for got, want in zip(out["data"], ref, strict=True):
        assert got["logprob"] == pytest.approx(want.logprob, abs=1e-5)
        assert got["is_greedy"] == want.is_greedy and got["num_tokens"] == want.num_tokens > 0
        assert got["logprob"] < 0
    # The two choices of one review differ: the route scores what it was sent, not a cached answer.
    assert out["data"][0]["logprob"] != out["data"][1]["logprob"]


BAD_LOGLIKELIHOOD = [
    pytest.param({"requests": []}, "requests is empty", id="empty"),
    pytest.param(
        {"requests": [{"context": "가", "continuation": ""}]}, "continuation is empty", id="empty-cont"
    ),
    pytest.param({"requests": [{"context": "가"}]}, "requests.0.continuation", id="missing-field"),
    pytest.param({"requests": "가"}, "requests", id="not-a-list"),
    pytest.param(
        {"requests": [{"context": "가", "continuation": "가나다라마바사" * 300}]},
        "continuation is",
        id="too-long",
    ),
    pytest.param(
        {"requests": [{"context": "가", "continuation": "나", "extra": 1}]}, "extra", id="unknown-key"
    ),
]


@pytest.mark.parametrize(("body", "message"), BAD_LOGLIKELIHOOD)
def test_bad_loglikelihood_is_400_and_next_request_works(
    server: str, client: openai.OpenAI, body: dict[str, Any], message: str
) -> None:
    response = httpx.post(f"{server}/v1/loglikelihood", json={"model": SERVED, **body}, timeout=120)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert message in error["message"] and "\n" not in error["message"]
    assert _still_serves(client)


def test_loglikelihood_unknown_model_is_404(server: str) -> None:
    body = {"model": "gpt-4o", "requests": [{"context": "가", "continuation": "나"}]}
    response = httpx.post(f"{server}/v1/loglikelihood", json=body, timeout=60)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def _echo(server: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{server}/v1/completions", json={"model": SERVED, **body}, timeout=120)


def test_echo_form_reports_the_prompt_token_logprobs(server: str, chat_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from hubkit.backends.transformers import encode_pair

    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    context, continuation = PAIRS[2]
    ctx, cont = encode_pair(tok, context, continuation)
    ids = ctx + cont
    # Token ids, max_tokens=0: OpenAI's legacy scoring request (echo the prompt, generate nothing).
    out = _echo(server, prompt=ids, echo=True, max_tokens=0, logprobs=1, temperature=0)
    assert out.status_code == 200, out.text
    (choice,) = out.json()["choices"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x < 0 for x in lp["token_logprobs"][1:])
    assert choice["text"] == tok.decode(ids)
    assert out.json()["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 0,
        "total_tokens": len(ids),
    }
    # The continuation's tokens sum to what the loglikelihood verb says, and their greediness agrees.
    (ref,) = _pool_loglikelihood([PAIRS[2]])
    scored = lp["token_logprobs"][len(ctx) :]
    assert sum(scored) == pytest.approx(ref.logprob, abs=1e-3)
    tops = lp["top_logprobs"][len(ctx) :]
    greedy = all(t == pytest.approx(max(top.values()), abs=1e-6) for t, top in zip(scored, tops, strict=True))
    assert greedy == ref.is_greedy

    # Text prompts (a batch of two), max_tokens=1 (lm-eval's form): the prompt's tokens plus one greedy token.
    prompts = [context + continuation, PROMPT]
    out = _echo(server, prompt=prompts, echo=True, max_tokens=1, logprobs=5, temperature=0, seed=1234)
    assert out.status_code == 200, out.text
    choices = out.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for text, c in zip(prompts, choices, strict=True):
        n_prompt = len(tok(text)["input_ids"])
        assert len(c["logprobs"]["token_logprobs"]) == n_prompt + 1
        assert all(len(top) >= 1 for top in c["logprobs"]["top_logprobs"][1:])
        # The extra token is the greedy next token: its log-prob is the largest at its position.
        assert c["logprobs"]["token_logprobs"][-1] == max(c["logprobs"]["top_logprobs"][-1].values())
        assert c["text"].startswith(text) and len(c["text"]) > len(text)
    # The same tokens scored as text in a batch or as ids alone: the same numbers.
    assert choices[0]["logprobs"]["token_logprobs"][1 : len(ids)] == pytest.approx(
        lp["token_logprobs"][1:], abs=1e-5
    )

    # echo without logprobs and nothing to generate: the prompt itself.
    plain = _echo(server, prompt=PROMPT, echo=True, max_tokens=0)
    assert plain.status_code == 200 and plain.json()["choices"][0]["text"] == PROMPT


BAD_ECHO = [
    pytest.param(
        {"logprobs": 1, "max_tokens": 0}, "only supported for scoring a prompt", id="logprobs-no-echo"
    ),
    pytest.param({"echo": True, "logprobs": 1, "max_tokens": 5}, "max_tokens must be 0", id="max-tokens-5"),
    pytest.param({"echo": True, "logprobs": 1}, "max_tokens must be 0", id="max-tokens-default"),
    pytest.param({"echo": True, "logprobs": 21, "max_tokens": 0}, "from 0 to 20", id="logprobs-21"),
    pytest.param({"echo": True, "logprobs": True, "max_tokens": 0}, "from 0 to 20", id="logprobs-bool"),
    pytest.param(
        {"echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0.8}, "temperature", id="sampled"
    ),
    pytest.param({"echo": True, "logprobs": 1, "max_tokens": 0, "stream": True}, "stream", id="stream"),
    pytest.param(
        {"echo": True, "logprobs": 1, "max_tokens": 0, "prompt": [5, 10**7]},
        "out of this model's vocab",
        id="token-out-of-vocab",
    ),  # fmt: skip
    pytest.param(
        {"echo": True, "logprobs": 1, "max_tokens": 0, "prompt": [5] * 600},
        "shorten the prompt",
        id="prompt-too-long",
    ),  # fmt: skip
    pytest.param(
        {"echo": True, "logprobs": 1, "max_tokens": 0, "prompt": [[5, 6], "가"]},
        "prompt must be",
        id="mixed-prompt",
    ),  # fmt: skip
    pytest.param({"echo": True, "logprobs": 1, "max_tokens": 0, "prompt": ""}, "prompt is empty", id="empty"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_ECHO)
def test_bad_echo_request_is_400_and_next_request_works(
    server: str, client: openai.OpenAI, overrides: dict[str, Any], message: str
) -> None:
    response = _echo(server, **{"prompt": PROMPT, **overrides})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and "\n" not in error["message"]
    assert error["type"] == "invalid_request_error"
    assert _still_serves(client)


def test_lm_eval_local_completions_scores_like_hubkit(server: str, chat_model_dir: Path) -> None:
    """lm-evaluation-harness's own API model against `hubkit serve`: the numbers of the pool's verb."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(
        base_url=f"{server}/v1/completions",
        model=SERVED,
        tokenizer=str(chat_model_dir),  # offline: the served model's own tokenizer files
        tokenizer_backend="huggingface",
        max_length=512,
        max_retries=1,
    )
    instances = [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(PAIRS)
    ]
    got = lm.loglikelihood(instances, disable_tqdm=True)
    ref = _pool_loglikelihood(PAIRS)
    worst = max(abs(lp - r.logprob) for (lp, _), r in zip(got, ref, strict=True))
    print(f"\n[parity] lm-eval local-completions vs the pool's loglikelihood: max |Δ| = {worst:.2e} nats")
    for (logprob, is_greedy), want in zip(got, ref, strict=True):
        assert logprob == pytest.approx(want.logprob, abs=1e-3)
        assert is_greedy == want.is_greedy


def test_sentiment_space_scores_through_the_server(server: str, tmp_path: Path) -> None:
    """`python spaces/sentiment/app.py` with HUBKIT_ENDPOINT set: no engine of its own, the server scores."""
    import math

    from gradio_client import Client

    from hubkit.demo import sentiment_requests

    port = _free_port()
    env = {**os.environ, "HUBKIT_ENDPOINT": server, "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "sentiment-space.log"
    space = Path(__file__).resolve().parents[1] / "spaces" / "sentiment"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=space, env=env, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/config", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        headline, _, table, _ = Client(url, verbose=False).predict(
            "\n".join(REVIEWS), None, api_name="/sentiment"
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert headline.startswith("### 3 reviews:")
    assert "Traceback" not in log.read_text(errors="replace")
    rows = table["data"]
    assert [r[1] for r in rows] == REVIEWS
    ref = _pool_loglikelihood([(r.context, r.continuation) for r in sentiment_requests(REVIEWS)])
    for i, row in enumerate(rows):
        neg, pos = ref[2 * i].logprob, ref[2 * i + 1].logprob
        assert row[4] == pytest.approx(1 / (1 + math.exp(neg - pos)), abs=2e-4)
        assert row[2] == ("긍정" if pos > neg else "부정")
