"""Task specs, prompts, few-shot sampling, data parsing and metrics: pure Python, no Ray, no engine.

KoBEST prompts are checked against lm-evaluation-harness's own task files and ``utils.py`` functions on
KoBEST-format rows, and the metrics against scikit-learn's ``classification_report``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from hubkit.datasets import NSMC_SAMPLE_TEST, _parse_text, detect_format, parse_columns
from hubkit.engine import Loglikelihood
from hubkit.errors import DataError
from hubkit.tasks import (
    ERROR_KINDS,
    Doc,
    FewShotSampler,
    RowError,
    builtin_tasks,
    load_task,
    parse_shots,
    task_from_mapping,
)

DATA = Path(__file__).parent / "data"
LM_EVAL_KOBEST = Path(__import__("lm_eval").__file__).parent / "tasks" / "kobest"


def _jsonl(name: str) -> list[dict[str, Any]]:
    return [
        json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def _nsmc(name: str, n: int | None = None) -> list[dict[str, str]]:
    lines = (NSMC_SAMPLE_TEST.parent / name).read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    return [
        dict(zip(header, line.split("\t"), strict=True)) for line in lines[1 : None if n is None else n + 1]
    ]


# ----------------------------------------------------------------------------------------------------
# Built-in tasks and lm-eval's prompts
# ----------------------------------------------------------------------------------------------------


def test_builtin_tasks_are_the_issue_s_list() -> None:
    assert builtin_tasks() == [
        "kobest_boolq",
        "kobest_copa",
        "kobest_hellaswag",
        "kobest_sentineg",
        "kobest_wic",
        "nsmc",
        "perplexity",
    ]


def test_nsmc_prompt_choices_and_requests() -> None:
    task = load_task("nsmc")
    doc = task.prepare({"id": "42", "document": "최고의 영화", "label": "1"}, 7)
    assert doc == Doc(row_id=7, id="42", prompt="문장: 최고의 영화 긍부정:", choices=("부정", "긍정"), gold=1)
    # lm-eval: the context is the prompt, each continuation is target_delimiter + choice.
    assert task.requests(doc) == [
        ("문장: 최고의 영화 긍부정:", " 부정"),
        ("문장: 최고의 영화 긍부정:", " 긍정"),
    ]
    shot = task.prepare({"id": "1", "document": "지루했다", "label": "0"}, 0)
    shot2 = task.prepare({"id": "2", "document": "또 보고 싶다", "label": 1}, 1)
    context = "문장: 지루했다 긍부정: 부정\n\n문장: 또 보고 싶다 긍부정: 긍정\n\n문장: 최고의 영화 긍부정:"
    assert task.requests(doc, [shot, shot2]) == [(context, " 부정"), (context, " 긍정")]


class _TagLoader(__import__("yaml").SafeLoader):
    """Reads lm-eval's task YAML, keeping ``!function utils.x`` as the string ``utils.x``."""


_TagLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def _lm_eval_task(name: str) -> dict[str, Any]:
    import yaml

    return yaml.load((LM_EVAL_KOBEST / f"{name}.yaml").read_text(encoding="utf-8"), Loader=_TagLoader)


def _lm_eval_render(name: str, doc: dict[str, Any]) -> tuple[str, list[str], int]:
    """(context, choices, gold) exactly as lm-eval 0.4's kobest task computes them."""
    from lm_eval.tasks.kobest import utils
    from lm_eval.utils import apply_template

    cfg = _lm_eval_task(name)
    if name == "kobest_hellaswag":  # process_docs builds query/choices/gold first
        doc = {
            **doc,
            "query": f"문장: {doc['context']}",
            "choices": [doc[f"ending_{i}"] for i in range(1, 5)],
        }

    def resolve(spec: Any) -> Any:
        if isinstance(spec, str) and spec.startswith("!function utils."):
            return getattr(utils, spec.removeprefix("!function utils."))(doc)
        if isinstance(spec, str) and spec in doc:
            return doc[spec]
        if isinstance(spec, str):
            return apply_template(spec, doc)
        return spec

    context = resolve(cfg["doc_to_text"])
    choices = list(resolve(cfg["doc_to_choice"]))
    target = resolve(cfg["doc_to_target"])
    gold = choices.index(target) if isinstance(target, str) and not target.isdigit() else int(target)
    return context, choices, gold


@pytest.mark.parametrize(
    "name", ["kobest_boolq", "kobest_copa", "kobest_hellaswag", "kobest_sentineg", "kobest_wic"]
)
def test_kobest_prompts_match_lm_eval(name: str) -> None:
    task = load_task(name)
    rows = _jsonl(f"{name}.jsonl")
    assert len(rows) >= 4
    for i, row in enumerate(rows):
        doc = task.prepare(row, i)
        context, choices, gold = _lm_eval_render(name, row)
        assert doc.prompt == context
        assert list(doc.choices) == choices
        assert doc.gold == gold
        assert task.requests(doc) == [(context, " " + c) for c in choices]


def test_copa_connector_and_an_unknown_question_kind() -> None:
    task = load_task("kobest_copa")
    row = _jsonl("kobest_copa.jsonl")[1]
    assert task.prepare(row, 0).prompt == "남자는 병원에 갔다.  왜냐하면"
    with pytest.raises(RowError) as err:
        task.prepare({**row, "question": "이유"}, 0)
    assert err.value.kind == "template" and "'이유'" in str(err.value)


def test_labels_for_reports() -> None:
    assert load_task("nsmc").labels() == ("부정", "긍정")
    assert load_task("kobest_hellaswag").labels() == ("ending_1", "ending_2", "ending_3", "ending_4")
    assert load_task("perplexity").kind == "perplexity"


# ----------------------------------------------------------------------------------------------------
# A user's YAML task
# ----------------------------------------------------------------------------------------------------


def test_a_user_task_from_yaml(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text("", encoding="utf-8")
    path = tmp_path / "review.yaml"
    path.write_text(
        "name: review_polarity\n"
        'prompt: "리뷰: {review}\\n평가:"\n'
        "choices: [나쁨, 좋음]\n"
        "target: sentiment\n"
        "label_map: {negative: 0, positive: 좋음}\n"
        "id_field: review_id\n"
        "metrics: [acc, f1]\n"
        "fewshot: {source: train.jsonl, seed: 7, sampler: first_n}\n"
        "shots: [0, 2]\n",
        encoding="utf-8",
    )
    task = load_task(path)
    assert task.name == "review_polarity"
    assert task.metrics == ("acc", "f1_macro")
    assert task.shots == (0, 2)
    assert task.fewshot.source == str(tmp_path / "train.jsonl")  # relative to the YAML's folder
    assert (task.fewshot.seed, task.fewshot.sampler) == (7, "first_n")
    doc = task.prepare({"review_id": 9, "review": "배우가 좋았다", "sentiment": "positive"}, 0)
    assert (doc.id, doc.prompt, doc.gold) == ("9", "리뷰: 배우가 좋았다\n평가:", 1)
    assert task.prepare({"review": "별로", "sentiment": "negative"}, 3).gold == 0
    assert task.prepare({"review": "별로", "sentiment": "negative"}, 3).id == "3"  # no id: its position


def test_lm_eval_style_keys_are_accepted() -> None:
    task = task_from_mapping(
        {
            "task": "sentineg_copy",
            "dataset_path": "skt/kobest_v1",  # where lm-eval finds data: ignored, hubkit reads --data
            "output_type": "multiple_choice",
            "doc_to_text": "문장: {{sentence}} 긍부정:",
            "doc_to_target": "{{label}}",
            "doc_to_choice": ["부정", "긍정"],
            "metric_list": [{"metric": "acc"}, {"metric": "f1", "aggregation": "x"}],
            "num_fewshot": 5,
        }
    )
    assert (task.name, task.target, task.metrics, task.shots) == (
        "sentineg_copy",
        "label",
        ("acc", "f1_macro"),
        (5,),
    )
    assert task.prepare({"sentence": "좋다", "label": 1}, 0).prompt == "문장: 좋다 긍부정:"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "name: x\nprompt: '{a}'\nchoices: [a, b]\ncolour: red\n",
            "unknown task field 'colour'; valid fields:",
        ),
        ("name: x\nprompt: '{a}'\nchoices: [a]\n", "at least two choices"),
        ("name: x\nprompt: '{a}'\nchoices: [a, b]\nmetrics: [bleu]\n", "metrics ['bleu'] are not available"),
        ("name: x\nprompt: '{a.b}'\nchoices: [a, b]\n", "plain field names"),
        ("name: x\ndoc_to_text: !function utils.f\nchoices: [a, b]\n", "cannot run code (!function)"),
        ("name: x\nkind: generate_until\n", "use multiple_choice or perplexity"),
        ("- just\n- a list\n", "must hold a mapping"),
    ],
)
def test_bad_task_yaml_names_the_fix(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "task.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(
        DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ) as err:
        load_task(path)
    assert "\n" not in str(err.value)


def test_unknown_task_name() -> None:
    with pytest.raises(DataError, match="unknown task 'kobest_nope'; use one of kobest_boolq"):
        load_task("kobest_nope")


# ----------------------------------------------------------------------------------------------------
# Rows that cannot be scored
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "kind", "message"),
    [
        ({"id": "1", "document": "", "label": "1"}, "missing_text", "field 'document' is empty"),
        ({"id": "1", "document": "   ", "label": "1"}, "missing_text", "field 'document' is empty"),
        ({"id": "1", "label": "1"}, "missing_text", "field 'document' is missing"),
        ({"id": "1", "document": "좋다"}, "missing_label", "label field 'label' is missing"),
        ({"id": "1", "document": "좋다", "label": ""}, "missing_label", "missing or empty"),
        (
            {"id": "1", "document": "좋다", "label": "2"},
            "bad_label",
            "label '2' is not one of the choices (0=부정, 1=긍정)",
        ),
        ({"id": "1", "document": "좋다", "label": -1}, "bad_label", "not one of the choices"),
        ({"id": "1", "document": "좋다", "label": "중립"}, "bad_label", "label '중립'"),
    ],
)
def test_malformed_rows_raise_row_errors(record: dict[str, Any], kind: str, message: str) -> None:
    with pytest.raises(RowError) as err:
        load_task("nsmc").prepare(record, 0)
    assert err.value.kind == kind and err.value.kind in ERROR_KINDS
    assert message in str(err.value)


def test_labels_by_index_name_or_choice_text() -> None:
    task = load_task("nsmc")
    for label, gold in [(0, 0), ("1", 1), (" 1 ", 1), (1.0, 1), ("긍정", 1), ("부정", 0), (True, 1)]:
        assert task.prepare({"document": "x", "label": label}, 0).gold == gold, label


# ----------------------------------------------------------------------------------------------------
# Few-shot examples
# ----------------------------------------------------------------------------------------------------


def _docs(name: str, n: int | None = None) -> list[Doc]:
    task = load_task("nsmc")
    return [task.prepare(r, i) for i, r in enumerate(_nsmc(name, n))]


def test_fewshot_is_deterministic_per_seed_and_row() -> None:
    pool = _docs("nsmc_train_200.txt")
    scored = _docs("nsmc_test_200.txt", 20)
    a = FewShotSampler(pool, seed=1234, exclude=scored)
    b = FewShotSampler(pool, seed=1234, exclude=scored)
    c = FewShotSampler(pool, seed=99, exclude=scored)
    for row in range(20):
        assert a.examples(row, 5) == b.examples(row, 5)
        # A smaller grid point's examples open the larger one's prompt.
        assert a.examples(row, 10)[:5] == a.examples(row, 5)
    assert [a.examples(r, 5) for r in range(20)] != [c.examples(r, 5) for r in range(20)]
    assert len({tuple(d.id for d in a.examples(r, 5)) for r in range(20)}) == 20  # rows get their own draws
    assert a.examples(3, 0) == []


def test_fewshot_never_draws_a_row_being_scored() -> None:
    scored = _docs("nsmc_test_200.txt", 50)
    train = _docs("nsmc_train_200.txt", 30)
    # A few-shot file that repeats scored rows, by id or by text under another id.
    leaked_id = scored[:5]
    leaked_text = [
        Doc(row_id=0, id=f"other-{d.id}", prompt=d.prompt, choices=d.choices, gold=d.gold)
        for d in scored[5:10]
    ]
    sampler = FewShotSampler([*leaked_id, *train, *leaked_text], seed=1, exclude=scored)
    assert sampler.excluded == 10
    assert len(sampler.pool) == 30
    scored_ids = {d.id for d in scored}
    scored_prompts = {d.prompt for d in scored}
    for row in range(50):
        for ex in sampler.examples(row, 30):
            assert ex.id not in scored_ids and ex.prompt not in scored_prompts
    with pytest.raises(DataError, match="31-shot needs 31 few-shot examples but the few-shot file has 30"):
        sampler.examples(0, 31)


def test_first_n_sampler_takes_the_file_order() -> None:
    pool = _docs("nsmc_train_200.txt", 10)
    sampler = FewShotSampler(pool, sampler="first_n")
    assert sampler.examples(0, 3) == pool[:3] == sampler.examples(17, 3)


# ----------------------------------------------------------------------------------------------------
# Parsing data files (the functions Ray Data runs), flags
# ----------------------------------------------------------------------------------------------------


def test_tsv_parsing_keeps_every_row() -> None:
    data = (
        "\ufeffid\tdocument\tlabel\r\n1\t좋아요\t1\r\n\n2\t\t0\n".encode()
        + b'3\tbad \xff bytes\t1\n4\tonly two\n5\t"quoted" text\t0'
    )
    rows = list(_parse_text(data, "tsv", "/x/a.txt"))
    records = [json.loads(r["record"]) for r in rows]
    assert [r["line"] for r in rows] == [
        2,
        4,
        5,
        6,
        7,
    ]  # blank lines are not rows; line numbers are the file's
    assert records[0] == {"id": "1", "document": "좋아요", "label": "1"}
    assert records[1]["document"] == "" and not rows[1]["error_kind"]  # empty text is the task's call
    assert rows[2]["error_kind"] == "undecodable" and "0xff" in rows[2]["error"] and records[2]["id"] == "3"
    assert (
        rows[3]["error_kind"] == "unreadable"
        and "2 tab-separated fields where the header has 3" in rows[3]["error"]
    )
    assert records[4]["document"] == '"quoted" text'  # NSMC has no quoting


def test_jsonl_and_csv_parsing() -> None:
    rows = list(_parse_text(b'{"a": 1}\n[1]\n{bad\n\n{"a": "\xff"}\n', "jsonl", "f.jsonl"))
    assert [r["error_kind"] for r in rows] == ["", "unreadable", "unreadable", "undecodable"]
    assert json.loads(rows[0]["record"]) == {"a": 1}
    rows = list(_parse_text(b'text,label\n"multi\nline, with comma",1\nx\xff,0\na,b,c\n', "csv", "f.csv"))
    assert json.loads(rows[0]["record"]) == {"text": "multi\nline, with comma", "label": "1"}
    assert [r["error_kind"] for r in rows] == ["", "undecodable", "unreadable"]


def test_formats_columns_and_shots_flags() -> None:
    assert [detect_format(p) for p in ("a.txt", "a.TSV", "a.csv", "a.jsonl", "a.json", "a.parquet")] == [
        "tsv",
        "tsv",
        "csv",
        "jsonl",
        "jsonl",
        "parquet",
    ]
    with pytest.raises(DataError, match="pass --format"):
        detect_format("data.xlsx")
    assert parse_columns("document=review, label=sentiment") == {"document": "review", "label": "sentiment"}
    assert parse_columns(["document=review", "label=y"]) == {"document": "review", "label": "y"}
    with pytest.raises(DataError, match="task_field=column"):
        parse_columns("document")
    assert parse_shots("0,5,10,50") == (0, 5, 10, 50)
    assert parse_shots([0, 5, 5]) == (0, 5)
    for bad in ("a", "-1", ""):
        with pytest.raises(DataError, match="--shots"):
            parse_shots(bad)


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------


def test_classification_scores_equal_scikit_learn() -> None:
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    from hubkit.scoring import classification_scores

    labels = ["a", "b", "c", "d"]  # "d" never occurs: scikit-learn leaves it out of macro F1 and the report
    golds = [0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 1, 2]
    preds = [0, 1, 0, 1, 2, 2, 2, 0, 2, 0, 0, 2]
    acc, f1, per_class, confusion = classification_scores(golds, preds, labels)
    assert acc == pytest.approx(accuracy_score(golds, preds)) == 8 / 12
    assert f1 == pytest.approx(f1_score(golds, preds, average="macro"))
    report = classification_report(golds, preds, target_names=labels[:3], output_dict=True, zero_division=0)
    assert list(per_class) == ["a", "b", "c"]
    for name, scores in per_class.items():
        assert scores.precision == pytest.approx(report[name]["precision"])
        assert scores.recall == pytest.approx(report[name]["recall"])
        assert scores.f1 == pytest.approx(report[name]["f1-score"])
        assert scores.support == report[name]["support"]
    assert [list(r[:3]) for r in confusion[:3]] == confusion_matrix(golds, preds).tolist()
    assert confusion[3] == (0, 0, 0, 0)
    # By hand: class "a" has tp=3, fp=2 (a b-row and a c-row predicted a), fn=1.
    assert (per_class["a"].precision, per_class["a"].recall) == (3 / 5, 3 / 4)


def test_acc_norm_divides_by_the_choice_length_in_characters() -> None:
    from hubkit.scoring import _scored_record

    task = task_from_mapping({"name": "t", "prompt": "{q}", "choices": ["예", "아니오 아님"]})
    doc = task.prepare({"q": "?", "label": 1}, 0)
    lls = [
        Loglikelihood(logprob=-3.0, is_greedy=False, num_tokens=1),
        Loglikelihood(logprob=-6.0, is_greedy=False, num_tokens=3),
    ]
    record = _scored_record(task, doc, 0, lls, "f:2")
    assert record["loglikelihoods"] == [-3.0, -6.0]
    assert record["loglikelihoods_norm"] == [-3.0, -1.0]  # -6 over the 6 characters of "아니오 아님"
    assert (record["prediction"], record["prediction_norm"], record["label"]) == (
        "예",
        "아니오 아님",
        "아니오 아님",
    )
    assert not math.isnan(record["loglikelihoods_norm"][1])
