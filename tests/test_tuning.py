"""``hubkit tune``: prompt tuning and full fine-tuning on the tiny GPT-NeoX, PEFT round trip, resume, errors.

Everything here trains a 650K-parameter model on a few dozen NSMC rows for a few dozen steps: real training,
real PEFT, real files, small enough to finish in well under two minutes on a busy 2-core machine.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from hubkit.datasets import NSMC_SAMPLE_TEST, NSMC_SAMPLE_TRAIN
from hubkit.errors import DataError, InvalidRequestError
from hubkit.tuning import TuneConfig, layout, tune

DATA = Path(__file__).parent / "data"
TRAIN = NSMC_SAMPLE_TRAIN
EVAL = NSMC_SAMPLE_TEST


def _subset(src: Path, dst: Path, rows: int) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines()
    dst.write_text("\n".join(lines[: rows + 1]) + "\n", encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tune-data")
    _subset(TRAIN, folder / "train.txt", 48)
    _subset(EVAL, folder / "eval.txt", 32)
    return folder


def _config(model: Path, data: Path, out: Path, **overrides) -> TuneConfig:
    values = dict(
        model=str(model),
        train=data / "train.txt",
        eval=data / "eval.txt",
        out=out,
        num_virtual_tokens=8,
        max_steps=24,
        batch_size=8,
        lr=0.3,
        warmup_steps=2,
        eval_every=6,
        log_every=3,
        patience=0,
        threads=1,
        progress=False,
    )
    values.update(overrides)
    return TuneConfig(**values)


@pytest.fixture(scope="module")
def prompt_run(tiny_model_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    config = _config(tiny_model_dir, data_dir, tmp_path_factory.mktemp("tuned") / "out")
    return config, tune(config)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------------------------- layout


def test_layout_reads_a_one_token_choice_from_the_longer_choices_row() -> None:
    # NSMC on the default model: " 부정" is one token, " 긍정" three: one forward row serves both.
    ex = layout(0, [1, 2, 3], [[7], [4, 5, 6]], gold=1)
    assert ex.extensions == ((4, 5),)
    assert ex.choice_rows == (0, 0)
    assert ex.length == 5
    # Choices that diverge after their first token need a row each.
    ex = layout(0, [1], [[4, 5, 9], [4, 8, 9], [4]], gold=0)
    assert ex.extensions == ((4, 5), (4, 8))
    assert ex.choice_rows == (0, 1, 0)


# --------------------------------------------------------------------------------------------- prompt tuning


def test_prompt_tuning_trains_and_the_loss_decreases(prompt_run) -> None:
    config, result = prompt_run
    assert result.finished and result.step == 24 and not result.stopped_early
    assert result.trainable_parameters == 8 * 128  # N virtual tokens x hidden size, nothing else
    assert result.parameters == result.trainable_parameters + result.frozen_parameters
    train = [r for r in _log(config.out) if r["type"] == "train"]
    evals = [r for r in _log(config.out) if r["type"] == "eval"]
    assert [r["step"] for r in train] == list(range(3, 25, 3))
    assert [r["step"] for r in evals] == [6, 12, 18, 24]
    assert train[-1]["loss"] < 0.8 * train[0]["loss"], [r["loss"] for r in train]
    assert all(set(r) >= {"step", "loss", "lr"} for r in train) and all("acc" in r for r in evals)
    tuning = json.loads((config.out / "tuning.json").read_text(encoding="utf-8"))
    assert tuning["trainable_parameters"] == 1024 and tuning["method"] == "prompt"
    assert tuning["best_step"] in (6, 12, 18, 24)
    assert (
        tuning["best_eval_acc"] == max(r["acc"] for r in evals)
        or abs(tuning["best_eval_acc"] - max(r["acc"] for r in evals)) < 1e-4
    )


def test_saved_adapter_is_peft_format_and_peft_reproduces_the_in_memory_scores(
    prompt_run, tiny_model_dir
) -> None:
    """PEFT loads the adapter itself; its logits give the scores the in-memory model wrote to predictions."""
    import pandas as pd
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hubkit.backends.transformers import encode_pair

    config, result = prompt_run
    out = config.out
    adapter_config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter_config["peft_type"] == "PROMPT_TUNING" and adapter_config["task_type"] == "CAUSAL_LM"
    assert adapter_config["num_virtual_tokens"] == 8 and adapter_config["token_dim"] == 128
    assert adapter_config["num_transformer_submodules"] == 1
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert list(tensors) == ["prompt_embeddings"]
    assert (
        tensors["prompt_embeddings"].shape == (8, 128) and tensors["prompt_embeddings"].dtype == torch.float32
    )
    best = load_file(str(out / "checkpoints" / "best.safetensors"))["prompt_embeddings"]
    assert torch.equal(best, tensors["prompt_embeddings"])  # the best evaluation's weights were shipped

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    frame = pd.read_parquet(out / "eval" / "predictions.parquet").head(6)
    worst = 0.0
    for text, expected, choices in zip(frame["text"], frame["loglikelihoods"], frame["choices"], strict=True):
        for choice, want in zip(choices, expected, strict=True):
            ctx, cont = encode_pair(tokenizer, text, " " + choice)
            ids = torch.tensor([ctx + cont])
            with torch.inference_mode():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 8:]
            logprobs = torch.log_softmax(logits.float(), -1)
            got = sum(logprobs[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))
            worst = max(worst, abs(got - want))
    assert worst < 1e-4, worst


def test_eval_run_folder_and_card(prompt_run, tiny_model_dir) -> None:
    from hubkit.results import read_metrics
    from hubkit.tuning import evaluate

    config, result = prompt_run
    out = config.out
    metrics = read_metrics(out / "eval")
    assert metrics.results[0].n_rows == 32 and metrics.results[0].n_errors == 0
    assert result.eval is not None and result.eval.results[0].metrics == metrics.results[0].metrics
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "| Trainable | 1024 (" in card and f"| All | {result.parameters} (100.0%) |" in card
    assert f"| Frozen | {result.frozen_parameters} (" in card
    assert "Classification report" in card and "library_name: peft" in card
    for plot in ("loss.png", "labels_vs_predictions.png"):
        assert (out / "plots" / plot).stat().st_size > 1000
        assert f"(plots/{plot})" in card
    assert "PeftModel.from_pretrained" in card

    # The reference scorer reloads the adapter from disk and agrees with the in-memory final evaluation.
    again = evaluate(
        str(tiny_model_dir),
        adapter=out,
        data=config.eval,
        out=out.parent / "again",
        threads=1,
        progress=False,
    )
    assert again.results[0].metrics == pytest.approx(metrics.results[0].metrics, abs=1e-9)


def test_card_and_publish_take_the_adapter_folder(prompt_run, capsys: pytest.CaptureFixture[str]) -> None:
    from hubkit.cli import main
    from hubkit.publish import publish

    config, _ = prompt_run
    assert main(["card", str(config.out), "--stdout"]) == 0
    assert "soft prompt of 8 virtual tokens" in capsys.readouterr().out
    sent = publish(config.out, "me/tiny-prompt", dry_run=True)
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "plots/labels_vs_predictions.png",
        "eval/predictions.parquet",
    } <= set(sent.files)
    assert not any(f.startswith("checkpoints/") for f in sent.files)


# --------------------------------------------------------------------------------------------- resume


def test_interrupted_run_resumes_to_the_same_adapter(prompt_run, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    config, result = prompt_run
    interrupted = replace(config, out=tmp_path / "out", stop_after=10)
    first = tune(interrupted)
    assert not first.finished and first.step == 10
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    # The same command again (stop_after is not part of the run's identity) continues at step 10.
    second = tune(replace(interrupted, stop_after=None))
    assert second.finished and second.resumed and second.step == 24
    want = load_file(str(config.out / "adapter_model.safetensors"))["prompt_embeddings"]
    got = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert (got - want).abs().max().item() < 1e-5
    steps = [(r["type"], r["step"]) for r in _log(tmp_path / "out")]
    assert steps == [(r["type"], r["step"]) for r in _log(config.out)]  # no step logged twice
    # A finished run is reported, not retrained.
    third = tune(replace(interrupted, stop_after=None))
    assert third.finished and third.resumed and third.best_step == second.best_step


def test_a_different_run_into_the_same_folder_is_refused(prompt_run) -> None:
    config, _ = prompt_run
    with pytest.raises(InvalidRequestError, match="different run.*--overwrite"):
        tune(replace(config, lr=0.01))


def test_early_stopping(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    # lr 0 never improves on the first evaluation: patience 2 stops at the third.
    result = tune(
        _config(tiny_model_dir, data_dir, tmp_path / "out", lr=1e-12, patience=2, eval_every=4, card=False)
    )
    assert result.stopped_early and result.step == 12 and result.best_step == 4


# --------------------------------------------------------------------------------------------- full fine-tuning


def test_full_fine_tuning_writes_a_model_folder(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "full"
    result = tune(_config(tiny_model_dir, data_dir, out, method="full", lr=1e-3, max_steps=12, card=False))
    assert result.trainable_parameters == result.parameters
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [
        n
        for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters(), strict=True)
        if not torch.equal(p, q)
    ]
    assert len(changed) > 10  # every layer moved, not just a head
    train = [r for r in _log(out) if r["type"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]


# --------------------------------------------------------------------------------------------- bad input


def test_missing_train_file_is_a_one_line_error(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from hubkit.cli import main

    code = main(
        ["tune", str(tiny_model_dir), "--train", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "nope.txt does not exist" in err
    assert not (tmp_path / "o").exists()


def test_label_outside_the_choices_is_a_one_line_error(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from hubkit.cli import main

    bad = tmp_path / "bad.txt"
    bad.write_text("id\tdocument\tlabel\n1\t좋아요\t1\n2\t별로\t0\n3\t최고\t7\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.txt:4: label '7' is not one of the choices \(0=부정, 1=긍정\)"):
        tune(_config(tiny_model_dir, tmp_path, tmp_path / "o", train=bad, eval=None))
    code = main(["tune", str(tiny_model_dir), "--train", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "label '7'" in err
    assert not (tmp_path / "o").exists()


def test_bad_settings_are_refused(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="--num-virtual-tokens"):
        tune(_config(tiny_model_dir, data_dir, tmp_path / "o", num_virtual_tokens=0))
    with pytest.raises(InvalidRequestError, match="--init-text"):
        tune(_config(tiny_model_dir, data_dir, tmp_path / "o", init="text"))
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
