"""KNOWN_FACTS is a claim about the bundled model: check it."""

from memit_lab import LoadedModel
from memit_lab.facts import KNOWN_FACTS, facts_by_relation, relations
from memit_lab.prompts import top_predictions


def test_known_facts_are_top1_for_the_bundled_model(smollm: LoadedModel) -> None:
    preds = top_predictions(smollm, [f.prompt for f in KNOWN_FACTS], k=1)
    misses = [f.prompt for f, p in zip(KNOWN_FACTS, preds, strict=True) if not (" " + f.target).startswith(p[0][0])]
    assert not misses
    for fact, pred in zip(KNOWN_FACTS, preds, strict=True):
        assert abs(pred[0][1] - fact.p_true) < 0.01, fact


def test_relations_are_consistent() -> None:
    assert len(KNOWN_FACTS) >= 40 and len(relations()) >= 5
    for relation in relations():
        # One relation, one wording after the subject ("The {}" and "{}" may differ before it).
        wordings = {f.template.split("{}")[1] for f in facts_by_relation(relation)}
        assert len(wordings) == 1, relation
