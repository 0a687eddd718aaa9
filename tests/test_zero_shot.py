"""Zero-shot through lm-eval: the offline analogy task, a real score on SmolLM2, clear errors, the run hook."""

import json
import sys
from types import SimpleNamespace

import pytest

from qatlab.errors import QatlabError
from qatlab.eval import analogy_task, zero_shot
from qatlab.models import load_causal_lm
from qatlab.train import train
from tests.test_train import make_cfg

import lm_eval  # noqa: F401  (the dev extra installs it; a missing one must fail, not skip)


@pytest.fixture(scope="module")
def docs():
    return analogy_task.build_docs(analogy_task.read_questions(analogy_task.questions_path()), seed=0)


def test_documents_are_four_way_choices_from_the_same_section(docs):
    questions = analogy_task.read_questions(analogy_task.questions_path())
    assert len(docs) == len(questions) == 19544
    answers, pools = {}, {}
    for s, a, b, c, d in questions:
        answers.setdefault((f"{a} is to {b} as {c} is to", s), set()).add(d)
        pools.setdefault(s, set()).update({b, d})
    for doc in docs:
        right = answers[(doc["context"], doc["section"])]
        assert len(set(doc["choices"])) == 4
        assert doc["choices"][doc["label"]] in right
        assert len(right & set(doc["choices"])) == 1  # exactly one right answer among the choices
        assert set(doc["choices"]) <= pools[doc["section"]]
    first = docs[0]
    assert first == analogy_task.build_docs(questions, seed=0)[0]  # deterministic
    assert [d["label"] for d in docs[:200]].count(0) < 100  # the answer's position is drawn, not fixed
    assert docs[:5] != analogy_task.build_docs(questions, seed=1)[:5]


def test_task_directory_is_an_lm_eval_task_over_local_json(tmp_path):
    folder = analogy_task.write_task(tmp_path, seed=0)
    yaml_text = (folder / "analogies.yaml").read_text()
    assert "task: analogies" in yaml_text and "dataset_path: json" in yaml_text
    data = folder / "analogies.jsonl"
    assert json.dumps(str(data.resolve())) in yaml_text
    assert len(data.read_text().splitlines()) == 19544
    assert analogy_task.write_task(tmp_path, seed=0) == folder  # written once, then reused


def test_analogies_run_through_lm_eval_on_the_tiny_model(tmp_path):
    model, tok = load_causal_lm("tiny-llama")
    scores = zero_shot.zero_shot(model, tok, ["analogies"], limit=16, batch_size=8, cache_dir=tmp_path)
    assert set(scores) == {"test/analogies/acc", "test/analogies/acc_norm"}
    assert all(0 <= v <= 1 for v in scores.values())
    assert not model.training


def test_smollm2_teacher_scores_well_above_chance(tmp_path):
    model, tok = load_causal_lm("embedded:smollm2-135m")
    scores = zero_shot.zero_shot(model, tok, ["analogies"], limit=100, batch_size=8, cache_dir=tmp_path)
    print(scores)
    assert scores["test/analogies/acc"] > 0.6  # chance is 0.25; measured 0.80 on these 100


@pytest.mark.parametrize(("options", "message"), [
    ({"tasks": ["analogies"], "limit": 0}, r"limit=0 must be a positive integer"),
    ({"tasks": ["analogies"], "batch_size": -1}, r"batch_size=-1 must be a positive integer"),
    ({"tasks": ["analogy"]}, r"unknown task\(s\) \['analogy'\].*analogies.*piqa"),
])
def test_bad_options_are_one_clear_error(tmp_path, monkeypatch, options, message):
    # a stand-in for lm-eval's full task index (building it reads ~15k YAML files, 15-30 s)
    monkeypatch.setattr(zero_shot, "_task_manager", lambda include, defaults: SimpleNamespace(all_tasks=["piqa"]))
    with pytest.raises(QatlabError, match=message):
        zero_shot.check(options, tmp_path)


def test_missing_lm_eval_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(QatlabError, match=r'pip install -e "\.\[eval\]"'):
        zero_shot.check({"tasks": ["analogies"]}, tmp_path)


def test_run_reports_student_and_teacher_accuracy(tmp_path):
    cfg = make_cfg(tmp_path, "experiment=tiny_smoke", "method=rtn", "logger=none",
                   "eval.zero_shot.tasks=[analogies]", "eval.zero_shot.limit=8")
    results = train(cfg)
    for key in ("test/analogies/acc", "test/analogies/acc_teacher", "test/analogies/acc_norm_teacher"):
        assert 0 <= results[key] <= 1, key
