"""The lm-eval bridge: official task definitions on local data, on the in-memory (edited) model. Its accuracy
equals scoring the same examples directly (sum of the continuation's log-probabilities, argmax over choices)."""
import pytest
import torch
from conftest import DATA_DIR
from omegaconf import OmegaConf

from outlierlab.evals.zeroshot import build_tasks, evaluate_zeroshot, paired_accuracy_change

pytestmark = pytest.mark.requires("data")


def direct_accuracy(loaded, task, limit):
    correct = 0
    for doc in list(task.eval_docs)[:limit]:
        context = task.doc_to_text(doc)
        choices = task.doc_to_choice(doc)
        scores = []
        for choice in choices:
            context_ids = loaded.with_bos(loaded.tokenizer(context, add_special_tokens=False)["input_ids"])
            continuation = loaded.tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([context_ids + continuation])
            with torch.no_grad():
                logprobs = loaded.model(ids).logits.log_softmax(-1)[0]
            positions = range(len(context_ids) - 1, ids.shape[1] - 1)
            scores.append(sum(float(logprobs[p, ids[0, p + 1]]) for p in positions))
        correct += int(max(range(len(choices)), key=scores.__getitem__) == task.doc_to_target(doc))
    return correct / limit


def test_bridge_accuracy_equals_direct_scoring(tiny_llama, tmp_path):
    suite = OmegaConf.create({"tasks": ["arc_easy", "sciq"], "limit": 6, "batch_size": 4})
    built = build_tasks(suite.tasks, str(DATA_DIR), tmp_path)
    result = evaluate_zeroshot(tiny_llama, suite, built)
    arc = result["tasks"]["arc_easy"]
    assert arc["samples"]["effective"] == 6 and arc["data"] == "reconstructed" and arc["task_version"] is not None
    assert arc["acc"] == pytest.approx(direct_accuracy(tiny_llama, built[1]["arc_easy"], 6))
    assert result["tasks"]["sciq"] == {"acc": None, "data": "skipped: no local data"}  # reported, not dropped
    assert result["mean_over"] == ["arc_easy"] and result["mean"] == arc["acc"]
    # every example's accuracy, for paired comparisons: their mean is lm-eval's accuracy
    assert arc["doc_ids"] == list(range(6)) and set(arc["correct"]) <= {0.0, 1.0}
    assert sum(arc["correct"]) / 6 == pytest.approx(arc["acc"])


def test_piqa_labels_are_joined_from_their_own_file(tmp_path):
    _, tasks, status = build_tasks(["piqa", "winogrande"], str(DATA_DIR), tmp_path)
    labels = (DATA_DIR / "piqa" / "valid-labels.lst").read_text().split()
    docs = list(tasks["piqa"].eval_docs)
    assert len(docs) == len(labels) == 1838
    assert [tasks["piqa"].doc_to_target(d) for d in docs[:20]] == [int(x) for x in labels[:20]]
    assert len(list(tasks["winogrande"].eval_docs)) == 1267 and status["winogrande"] == "verbatim"


@pytest.mark.parametrize("name,count", [("boolq", 3270), ("lambada_openai", 5153), ("arc_challenge", 1172),
                                        ("openbookqa", 500), ("rte", 277), ("hellaswag", 10042), ("copa", 100)])
def test_other_local_tasks_load_with_official_templates(name, count, tmp_path):
    _, tasks, status = build_tasks([name], str(DATA_DIR), tmp_path)
    docs = list(tasks[name].eval_docs)
    assert len(docs) == count and status[name]
    assert tasks[name].doc_to_text(docs[0])  # the official template renders on the local fields
    assert tasks[name].doc_to_target(docs[0]) is not None


def test_rebuilt_copa_and_hellaswag_prompts_match_the_local_text(tmp_path):
    _, tasks, status = build_tasks(["copa", "hellaswag"], str(DATA_DIR), tmp_path)
    copa = list(tasks["copa"].eval_docs)[0]
    assert tasks["copa"].doc_to_text(copa) == "The man turned on the faucet, therefore"
    assert tasks["copa"].doc_to_target(copa) == " water flowed from the spout."  # gold = 1, the second choice
    assert tasks["copa"].doc_to_choice(copa) == [" the toilet filled with water.", " water flowed from the spout."]
    swag = list(tasks["hellaswag"].eval_docs)[0]
    assert tasks["hellaswag"].doc_to_text(swag) == "Roof shingle removal: A man is sitting on a roof. he"
    assert tasks["hellaswag"].doc_to_target(swag) == 3 and len(tasks["hellaswag"].doc_to_choice(swag)) == 4
    assert status["hellaswag"].startswith("approximate")


def test_every_suite_names_lm_eval_tasks_with_local_data_or_a_known_gap():
    """A suite may list a task without local data only if it is a documented gap (sciq), reported as skipped."""
    from conftest import CONF

    from outlierlab.evals.zeroshot import LOCAL_TASKS
    known_gaps = {"sciq"}
    for path in sorted((CONF / "eval" / "zeroshot").glob("*.yaml")):
        tasks = set(OmegaConf.load(path).tasks)
        assert tasks - set(LOCAL_TASKS) <= known_gaps, path.name


def _result(**tasks):
    return {"tasks": {name: {"acc": sum(correct) / len(correct), "doc_ids": list(range(len(correct))),
                             "correct": [float(c) for c in correct]} for name, correct in tasks.items()}}


def test_a_paired_accuracy_change_is_tighter_than_two_stderrs():
    """40 examples a task; the edited model loses the same 6 examples of each task and nothing else: a paired
    interval separates the 15-point drop, which two unpaired stderrs (about 8 points each) would not."""
    base = _result(a=[1] * 20 + [0] * 20, b=[1] * 30 + [0] * 10)
    edited = _result(a=[0] * 6 + [1] * 14 + [0] * 20, b=[0] * 6 + [1] * 24 + [0] * 10)
    change = paired_accuracy_change(edited, base)
    assert change["change"] == pytest.approx(-0.15) and change["tasks"] == ["a", "b"]
    low, high = change["change_ci"]
    assert low <= -0.15 <= high < 0
    mixed = _result(a=[0] * 6 + [1] * 20 + [0] * 14, b=[1] * 30 + [0] * 10)  # 6 lost, 6 gained: no change
    low, high = paired_accuracy_change(mixed, base)["change_ci"]
    assert low < 0 < high
    other_examples = {"tasks": {"a": {**base["tasks"]["a"], "doc_ids": list(range(1, 41))}}}
    assert paired_accuracy_change(other_examples, base) is None  # never paired across different examples


def test_the_variant_table_shows_the_paired_zero_shot_change():
    from outlierlab.studies.variants import VariantTable
    base = _result(a=[1] * 20 + [0] * 20)
    edited = _result(a=[0] * 6 + [1] * 14 + [0] * 20)
    table = VariantTable(["wikitext2"], zeroshot=True)
    for variant, result in (("original", base), ("edited", edited)):
        table.add(variant, {"ppl": {"wikitext2": {"ppl": 30.0, "window_nll": [3.4, 3.4]}},
                            "zeroshot": {**result, "mean": result["tasks"]["a"]["acc"]}})
    rows = {row["variant"]: row for row in table.table("c").rows}
    assert "zero_shot_change" not in rows["original"]
    assert rows["edited"]["zero_shot_change"] == pytest.approx(-15.0)
    low, high = rows["edited"]["zero_shot_change_ci"]
    assert low <= -15.0 <= high < 0
    assert "zero_shot_change" in [column.key for column in table.columns()]
