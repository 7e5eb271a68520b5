"""Model cards: golden files, the seeds' figures, and sections that stay out when their input is missing.

Regenerate the golden cards after an intended change with ``UPDATE_GOLDEN=1 pytest tests/test_cards.py``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hubkit.cards import (
    build_card,
    classification_report,
    format_layer_table,
    layer_table,
    parameter_summary,
    read_train_log,
)
from hubkit.errors import DataError, InvalidRequestError
from hubkit.results import PREDICTIONS_FILE, ClassScores, RunMetrics, ShotResult, write_metrics

GOLDEN = Path(__file__).parent / "golden"
SEEDS = json.loads((GOLDEN / "seed_figures.json").read_text(encoding="utf-8"))
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
REPO_ID = "hubkit-test/tiny-neox"
LABELS = ("부정", "긍정")

# --------------------------------------------------------------------------------------------- fixtures
# Small, deterministic inputs in the schemas the producers write (hubkit.results, hubkit.training).


def _shot(shots: int, confusion: list[list[int]]) -> ShotResult:
    (tn, fp), (fn, tp) = confusion
    per_class = {}
    for label, tp_, fp_, fn_ in (("부정", tn, fn, fp), ("긍정", tp, fp, fn)):
        p, r = tp_ / (tp_ + fp_), tp_ / (tp_ + fn_)
        per_class[label] = ClassScores(precision=p, recall=r, f1=2 * p * r / (p + r), support=tp_ + fn_)
    n = tn + fp + fn + tp
    f1_macro = sum(s.f1 for s in per_class.values()) / 2
    return ShotResult(
        shots=shots,
        n_rows=n,
        n_errors=0,
        metrics={"acc": (tn + tp) / n, "acc_norm": (tn + tp + 2) / n, "f1_macro": f1_macro},
        per_class=per_class,
        labels=LABELS,
        confusion=tuple(tuple(row) for row in confusion),
    )


def _predictions(path: Path, shots: tuple[int, ...], n: int = 100) -> None:
    import pandas as pd

    rng = random.Random(0)
    rows = []
    for s in shots:
        for i in range(n):
            label = i % 2
            lls = [rng.gauss(-20, 3), rng.gauss(-20, 3)]
            lls[label] += rng.gauss(1.5, 2)
            rows.append(
                {
                    "row_id": i,
                    "id": str(1000 + i),
                    "shots": s,
                    "text": "리뷰",
                    "label": label,
                    "prediction": int(lls[1] > lls[0]),
                    "loglikelihoods": lls,
                    "loglikelihoods_norm": [v / 10 for v in lls],
                    "error": None,
                }
            )
    pd.DataFrame(rows).to_parquet(path)


def make_runs(root: Path) -> list[Path]:
    """Three run folders: this model on NSMC (0/5-shot, with predictions), a baseline on NSMC (0/5/10-shot,
    another model: a comparison row only), and this model's perplexity."""
    this = root / "nsmc-tiny"
    write_metrics(
        this,
        RunMetrics(
            task="nsmc",
            dataset="nsmc",
            model=REPO_ID,
            results=(_shot(0, [[40, 10], [12, 38]]), _shot(5, [[44, 6], [9, 41]])),
            backend="vllm",
            created="2025-01-01T00:00:00Z",
            config={"split": "test"},
        ),
    )
    _predictions(this / PREDICTIONS_FILE, (0, 5))
    base = root / "nsmc-polyglot"
    write_metrics(
        base,
        RunMetrics(
            task="nsmc",
            dataset="nsmc",
            model="EleutherAI/polyglot-ko-1.3b",
            model_parameters=1_331_810_304,
            results=tuple(
                ShotResult(shots=s, n_rows=100, n_errors=0, metrics={"f1_macro": v})
                for s, v in ((0, 0.6514), (5, 0.7206), (10, 0.7389))
            ),
        ),
    )
    ppl = root / "ppl-tiny"
    write_metrics(
        ppl,
        RunMetrics(
            task="nsmc-perplexity",
            dataset="nsmc",
            model=REPO_ID,
            results=(ShotResult(shots=0, n_rows=50, n_errors=1, metrics={"perplexity": 52.3125}),),
        ),
    )
    return [this, base, ppl]


TRAINING_JSON = {
    "command": "hubkit train-lm nsmc/reviews_unlabeled.txt --out tiny-neox --preset neox-tiny --steps 100",
    "config": {
        "data": "/data/nsmc/reviews_unlabeled.txt",
        "batch_size": 8,
        "seq_len": 64,
        "lr": 0.001,
    },
    "preset": "neox-tiny",
    "final_loss": 3.2104,
    "heldout": {
        "perplexity": 48.21,
        "bits_per_byte": 1.2345,
        "documents": 200,
        "data": "/data/nsmc/ratings_test.txt",
    },
    "steps": 100,
    "tokens_seen": 51200,
    "train_seconds": 60.0,
    "tokens_per_second": 853.3,
    "corpus": {"documents": 2000, "tokens": 40000, "epochs": 1.28},
    "tokenizer": {"type": "byte-level BPE", "vocab_size": 1000},
}


def make_model_dir(tiny_model_dir: Path, dest: Path) -> Path:
    """The session's tiny GPT-NeoX plus the files `hubkit train-lm` leaves next to it."""
    shutil.copytree(tiny_model_dir, dest)
    (dest / "training.json").write_text(json.dumps(TRAINING_JSON, indent=2), encoding="utf-8")
    with (dest / "train_log.jsonl").open("w", encoding="utf-8") as f:
        for step in range(10, 101, 10):
            row = {
                "type": "train",
                "step": step,
                "loss": round(7.0 - step / 40, 4),
                "lr": 1e-3,
                "tokens": step * 512,
            }
            f.write(json.dumps(row | {"elapsed": step * 0.6}) + "\n")
            if step % 50 == 0:
                f.write(json.dumps({"type": "eval", "step": step, "perplexity": 300.0 - step * 2.5}) + "\n")
    return dest


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tiny_model_dir, tmp_path_factory.mktemp("m") / "tiny-neox")


# --------------------------------------------------------------------------------------------- helpers


def check_golden(text: str, name: str) -> None:
    path = GOLDEN / name
    if UPDATE or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        if not UPDATE:
            pytest.fail(f"golden file {path} was missing and has been written; check it and rerun")
    assert text == path.read_text(encoding="utf-8"), f"card differs from {path}; UPDATE_GOLDEN=1 to accept"


def tables(text: str) -> list[list[list[str]]]:
    """Markdown tables of ``text`` (outside code blocks), each a list of rows of cells."""
    out, current, in_code = [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if not in_code and line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


def assert_tables_well_formed(text: str) -> None:
    for table in tables(text):
        assert len(table) >= 3, f"a table without rows: {table}"
        width = len(table[0])
        assert all(len(row) == width for row in table), f"ragged table: {table}"
        assert all(set(cell) <= {"-", ":"} and cell for cell in table[1]), f"bad separator row: {table[1]}"
        assert all(any(cell for cell in row) for row in table[2:]), f"an empty row: {table}"


def hyper_table(text: str) -> dict[str, str]:
    table = next(t for t in tables(text) if t[0] == ["Hyperparameter", "Value"])
    out = {}
    for key, value in table[2:]:
        m = re.fullmatch(r"\\\\\((\w+)_\{(\w+)\}\\\\\)", key)
        out[f"{m[1]}_{m[2]}" if m else key] = re.sub(r"\[([^]]+)\]\([^)]+\)", r"\1", value)
    return out


def linked_images(text: str) -> list[str]:
    return re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)


# --------------------------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("preset", ["polyglot-ko-3.8b", "kogpt-6b"])
def test_preset_card_reproduces_the_seed_table_exactly(preset: str) -> None:
    card = build_card(preset=preset)
    assert hyper_table(card.text) == SEEDS[preset]["table"]
    if "sentence" in SEEDS[preset]:
        assert SEEDS[preset]["sentence"] in card.text
    assert_tables_well_formed(card.text)


def test_gpt_neox_ko_card_matches_the_seed_digits() -> None:
    text = build_card(preset="gpt-neox-ko-1.3b").text
    ours = {k: re.sub(r"\D", "", v) or v for k, v in hyper_table(text).items()}
    seed = {k: re.sub(r"\D", "", v) or v for k, v in SEEDS["gpt-neox-ko-1.3b"]["table"].items()}
    assert ours == seed
    assert SEEDS["gpt-neox-ko-1.3b"]["sentence"] in text


def test_polyglot_preset_card_golden() -> None:
    check_golden(build_card(preset="polyglot-ko-3.8b").text, "polyglot-ko-3.8b.md")


def test_kogpt_layer_rows_match_ko_gpt_bot_sc() -> None:
    from hubkit.presets import build_model

    model = build_model("kogpt-6b", meta=True)
    rows = {r.name: r for r in layer_table(model, max_depth=4)}
    for name, (params, mb) in SEEDS["ko-gpt-bot-sc"]["layers"].items():
        assert (f"{rows[name].parameters:,}", f"{rows[name].megabytes:.2f}") == (params, mb), name
    # ko-gpt-bot-sc froze KoGPT6B whole: its "Freezed" count is this preset's total.
    frozen = SEEDS["ko-gpt-bot-sc"]["frozen"]
    assert parameter_summary(frozen, 0) == [
        ("All", f"{frozen} (100.0%)"),
        ("Trainable", "0 (0.0%)"),
        ("Frozen", f"{frozen} (100.0%)"),
    ]
    text = format_layer_table(layer_table(model, max_depth=4))
    assert re.search(r"^ *--lm_head: +264,305,664 +4\.29% +1008\.25$", text, re.M)
    assert text.splitlines()[0].split() == ["LAYER", "NAME", "#PARAMS", "RATIO", "MEM(MB)"]


def test_shared_weights_are_counted_once() -> None:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    assert model.lm_head.weight is model.gpt_neox.embed_in.weight
    rows = {r.name: r for r in layer_table(model, max_depth=2)}
    distinct = sum(p.numel() for p in model.parameters())
    assert rows[""].parameters == distinct and rows[""].ratio == 1.0
    assert rows["lm_head"].shared == "shared" and rows["lm_head"].label == "lm_head(shared)"
    assert rows["gpt_neox.embed_in"].shared == ""
    # The head is listed with its (shared) weights but the total has them once.
    assert rows["gpt_neox"].parameters + rows["lm_head"].parameters > distinct


# --------------------------------------------------------------------------------------------- model folder cards


def test_full_card_golden_and_files(model_dir: Path, runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "card"
    card = build_card(
        model_dir, results=runs, out_dir=out, repo_id=REPO_ID, revision="tiny-neox-float16", dtype="float16"
    )
    check_golden(card.text, "tiny-neox/README.md")
    assert card.path == out / "README.md" and card.path.read_text(encoding="utf-8") == card.text
    assert_tables_well_formed(card.text)
    # Every linked plot is a PNG in the folder, referenced by a relative path, and every plot is linked.
    links = linked_images(card.text)
    assert sorted(links) == sorted(p.relative_to(out).as_posix() for p in card.plots)
    assert {
        "plots/loss.png",
        "plots/nshot_nsmc.png",
        "plots/nsmc-tiny_confusion_0shot.png",
        "plots/nsmc-tiny_scores_5shot.png",
    } <= set(links)
    for link in links:
        assert not link.startswith(("/", "http")) and (out / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The baseline is a comparison row of the n-shot table, not part of this model's results.
    assert "| EleutherAI/polyglot-ko-1.3b | 1.3B | 0.6514 | 0.7206 | 0.7389 |" in card.text
    assert "| hubkit-test/tiny-neox (this) |" in card.text
    assert 'revision="tiny-neox-float16"' in card.text
    assert "hf download hubkit-test/tiny-neox --revision tiny-neox-float16" in card.text


def test_model_index_has_every_metric_of_this_models_runs(model_dir: Path, runs: list[Path]) -> None:
    from huggingface_hub import ModelCard

    card = build_card(model_dir, results=runs, repo_id=REPO_ID)
    data = ModelCard(card.text).data
    assert data.language == "ko" and data.license == "apache-2.0" and data.library_name == "transformers"
    assert data.datasets == ["nsmc"] and "hubkit" in data.tags
    got = {(r.dataset_name, r.metric_name): r.metric_value for r in data.eval_results}
    expected = {}
    for run in runs[:1] + runs[2:]:
        metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
        for shot in metrics["results"]:
            for key, value in shot["metrics"].items():
                expected[(metrics["task"], f"{key} ({shot['shots']}-shot)")] = round(value, 4)
    assert got == expected and card.eval_results == len(expected) == 7
    assert {r.metric_type for r in data.eval_results} == {"accuracy", "f1", "perplexity"}
    assert data.eval_results[0].dataset_split == "test"


def test_classification_report_rows() -> None:
    rows = classification_report(_shot(0, [[40, 10], [12, 38]]))
    assert [r[0] for r in rows] == ["부정", "긍정", "accuracy", "macro avg", "weighted avg"]
    assert rows[0] == (
        "부정",
        f"{40 / 52:.4f}",
        "0.8000",
        f"{2 * (40 / 52) * 0.8 / (40 / 52 + 0.8):.4f}",
        "50",
    )
    assert rows[2] == ("accuracy", "", "", "0.7800", "100")
    assert classification_report(ShotResult(shots=0, n_rows=1, n_errors=0, metrics={"perplexity": 3.0})) == []


def test_missing_inputs_leave_sections_out(model_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        shutil.copy(model_dir / name, bare / name)
    card = build_card(bare, out_dir=tmp_path / "out")
    assert "## Evaluation" not in card.text and "## Training\n" not in card.text
    assert "model-index" not in card.text and "datasets:" not in card.text and card.plots == ()
    assert "### Hyperparameters" in card.text
    assert "## How to use" in card.text and "## Limitations" in card.text
    assert_tables_well_formed(card.text)
    assert not (tmp_path / "out" / "plots").exists()
    # A train log alone: the training table from the log, and its plot.
    log_only = build_card(bare, train_log=model_dir / "train_log.jsonl", out_dir=tmp_path / "out2")
    assert "| final training loss | 4.5000 |" in log_only.text and "plots/loss.png" in log_only.text
    assert "## Evaluation" not in log_only.text
    assert_tables_well_formed(log_only.text)


def test_perplexity_only_run_has_no_classification_parts(
    model_dir: Path, runs: list[Path], tmp_path: Path
) -> None:
    card = build_card(model_dir, results=[runs[2]], out_dir=tmp_path / "o", repo_id=REPO_ID)
    assert "### nsmc-perplexity: perplexity by number of few-shot examples" in card.text
    assert "Classification report" not in card.text and "confusion" not in card.text
    assert [p.name for p in card.plots] == ["loss.png"]  # one shot: no n-shot curve
    assert_tables_well_formed(card.text)


def test_bad_inputs_are_one_line_errors(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="one of them"):
        build_card()
    with pytest.raises(DataError, match="not a hubkit run folder"):
        build_card(model_dir, results=[tmp_path])
    bad = tmp_path / "train_log.jsonl"
    bad.write_text('{"step": 1, "loss": 2.0}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train_log.jsonl:2 is not JSON"):
        read_train_log(bad)
    future = tmp_path / "future"
    future.mkdir()
    (future / "metrics.json").write_text(
        json.dumps({"schema": "hubkit.run/2", "results": []}), encoding="utf-8"
    )
    with pytest.raises(DataError, match="upgrade hubkit"):
        build_card(model_dir, results=[future])


def test_cli_card_for_a_seed_preset_prints_the_seed_figures() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hubkit.cli", "card", "--preset", "polyglot-ko-3.8b"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| \\\\(n_{parameters}\\\\) | 3,809,974,272 |" in proc.stdout
    assert "| \\\\(n_{vocab}\\\\) | 30,003 / 30,080 |" in proc.stdout
    assert hyper_table(proc.stdout) == SEEDS["polyglot-ko-3.8b"]["table"]


def test_cli_card_bad_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hubkit.cli import main

    assert main(["card", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err
    # A name that could be a Hub id: a card needs the weights on disk, and the error says how to get them.
    assert main(["card", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and "hf download ID --local-dir DIR" in err


def test_a_run_that_scored_nothing_leaves_no_broken_table(model_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty-run"
    write_metrics(empty, RunMetrics(task="kobest_copa", model=REPO_ID, results=()))
    card = build_card(model_dir, results=[empty], repo_id=REPO_ID)
    assert "kobest_copa" not in card.text.split("## How to use")[0] and card.eval_results == 0
    assert_tables_well_formed(card.text)


def test_wheel_ships_the_card_templates_and_cards_render_from_package_data(tmp_path: Path) -> None:
    import zipfile

    from hubkit.cards import MODEL_CARD_TEMPLATE, TEMPLATES_DIR
    from hubkit.publish import build_hubkit_wheel

    # The location still works in a checkout: model_cards/templates is the package's folder.
    root = Path(__file__).resolve().parents[1]
    checkout = root / "model_cards" / "templates" / MODEL_CARD_TEMPLATE
    assert checkout.resolve() == (TEMPLATES_DIR / MODEL_CARD_TEMPLATE).resolve()
    assert TEMPLATES_DIR.is_relative_to(root / "hubkit")

    wheel = build_hubkit_wheel(tmp_path / "dist")  # `pip wheel --no-deps` of this checkout
    names = set(zipfile.ZipFile(wheel).namelist())
    for template in ("model_card.md.j2", "space_card.md.j2"):
        assert f"hubkit/assets/card_templates/{template}" in names
    assert {"hubkit/assets/ko-nsmc-neox/model.safetensors", "hubkit/assets/tasks/nsmc.yaml"} <= names

    # Installed from the wheel (not this checkout), run outside the source tree, no HUBKIT_CARD_TEMPLATES.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target",
                    str(site), str(wheel)], check=True, timeout=300)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "HUBKIT_CARD_TEMPLATES"} | {"PYTHONPATH": str(site)}
    code = (
        "import hubkit.cards as c\n"
        "print(c.TEMPLATES_DIR)\n"
        "print(c.build_card(preset='polyglot-ko-3.8b').text, end='')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    templates_dir, text = proc.stdout.split("\n", 1)
    assert Path(templates_dir).is_relative_to(site)
    assert text == build_card(preset="polyglot-ko-3.8b").text
