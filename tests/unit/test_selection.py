"""Best-model selection (runtime/selection.py, issue 35): the imbalance switch and the selection rule."""

from infoprompt_ds.runtime.selection import Candidate, better, default_metric, single_class


def test_imbalanced_validation_switches_auto_accuracy_to_macro_f1():
    labels = [1] * 7 + [0] * 3  # 70% majority
    metric, note = default_metric("auto", "classification", "accuracy", labels)
    assert metric == "macro_f1" and "70%" in note and "macro_f1" in note


def test_balanced_validation_and_explicit_choices_keep_their_metric():
    assert default_metric("auto", "classification", "accuracy", [0, 1] * 5) == ("accuracy", None)
    assert default_metric("auto", "classification", "accuracy", [1] * 6 + [0] * 4) == ("accuracy", None)  # 60%
    imbalanced = [1] * 9 + [0]
    assert default_metric("accuracy", "classification", "accuracy", imbalanced) == ("accuracy", None)
    assert default_metric("mcc", "classification", "mcc", imbalanced) == ("mcc", None)
    assert default_metric("auto", "classification", "f1", imbalanced) == ("f1", None)  # a preset's own metric
    assert default_metric("auto", "ner", "entity_f1", imbalanced) == ("entity_f1", None)


def test_single_class():
    assert single_class([1, 1, 1]) and not single_class([1, 0, 1])
    assert not single_class([[0, 0], [0, 0]])  # NER rows never count
    assert not single_class([1])


def test_single_class_predictor_is_never_selected_over_one_that_is_not():
    untrained = Candidate(0, 0.55, single_class=False)
    majority = Candidate(20, 0.70, single_class=True)  # higher accuracy: predicts the majority everywhere
    assert not better(majority, untrained)
    assert better(untrained, majority)  # a later several-class model replaces a single-class best
    assert better(majority, untrained, explicit_accuracy=True)  # the user asked for accuracy: it decides
    assert better(Candidate(40, 0.2, True), Candidate(20, 0.1, True))  # both single-class: the metric decides


def test_ties_keep_the_earlier_step_and_the_first_is_always_taken():
    assert better(Candidate(0, 0.5, False), None)
    assert not better(Candidate(20, 0.5, False), Candidate(0, 0.5, False))
    assert better(Candidate(20, 0.51, False), Candidate(0, 0.5, False))


def test_lm_label_cue_names_the_label_words_without_a_preset():
    from transformers import LlamaConfig

    from infoprompt_ds.data import readout

    config = LlamaConfig(architectures=["LlamaForCausalLM"])
    words = {"pos": "good", "neg": "bad"}
    assert readout.resolve("lm_label", config, "classification", words, False).cue == "\nAnswer (good or bad):"
    three = {"a": "yes", "b": "maybe", "c": "no"}
    assert readout.resolve("lm_label", config, "classification", three, False).cue == "\nAnswer (yes, maybe or no):"
    assert readout.resolve("lm_label", config, "classification", words, False, preset_cue="\nSentiment:").cue \
        == "\nSentiment:"
    assert readout.resolve("lm_label", config, "classification", words, False, cue="\nTone:").cue == "\nTone:"


def test_class_weights_inverse_frequency():
    import pytest
    import torch

    from infoprompt_ds.config import ConfigError, TrainConfig
    from infoprompt_ds.method.loss import inverse_frequency

    w = inverse_frequency([0, 0, 0, 1], 2)
    assert torch.allclose(w, torch.tensor([4 / 6, 4 / 2]))  # n / (C * n_c): each class weighs 2 in all
    assert inverse_frequency([0, 1, 1, 0], 2) is None  # balanced (any k_shot sample): CE left exactly as is
    assert torch.allclose(inverse_frequency([[0, -100, 0], [1, 0]], 2), torch.tensor([4 / 6, 2.0]))  # NER tags
    with pytest.raises(ConfigError, match="class_weights"):
        TrainConfig(class_weights="balanced")
