"""The `peft` arm of the study (issue 13): Hugging Face PEFT prompt tuning trained by the HF Trainer, what a
user would pick instead of our vanilla prompt tuning, on the same backbone, data, steps and DeepSpeed json.

    python benchmarks/peft_prompt.py <train.py flags>     # writes output_dir/metrics.json like train.py
    python benchmarks/peft_prompt.py --peft_type prefix <train.py flags>   # PEFT prefix tuning instead

--peft_type (this script's only own flag): prompt (PromptTuningConfig, the default: a prompt at the input) or
prefix (PrefixTuningConfig, issue 33's study v3: n_virtual_tokens trainable key/value prefixes in every
layer's attention, PEFT's defaults: no reparameterisation MLP, random init; prompt_init is ignored there).

A drop-in for `train.py` in benchmarks/study.py: it takes every TrainConfig flag (parsed by the project's
own parse_config, so every default is train.py's; method, the InfoPrompt weights, cache and checkpoint
fields are accepted and ignored) and writes the metrics.json keys train.py writes. One rank (what the
study runs).

What is the same as our `prompt` arm:
  - data: infoprompt_ds.data.load.prepare_data (same splits, k-shot sample, max_eval_samples subsets, and the
    same token ids: for readout=lm_label the input followed by the cue);
  - the DeepSpeed json (cfg.deepspeed, default zero3), passed as TrainingArguments(deepspeed=...): the HF
    Trainer fills its "auto" values (batch, clipping, AdamW lr/betas/eps/weight decay, WarmupDecayLR with
    linear warmup over ceil(warmup_ratio * steps) or warmup_steps, bucket sizes) as fill_ds_config does;
    output_dir/ds_config.json holds the Trainer's filled json and metrics.json `ds_config_vs_train_py` any
    value that differs from train.py's (the Trainer uses at least 1 warmup step);
  - steps (max_steps, or train.py's plan_steps for epochs), micro-batch, gradient accumulation, seed;
  - validation every eval_steps and at the last step, the best-validation prompt kept (in memory) and
    tested once (last weights with --load_best_model_at_end false), eval/<metric> logged to MLflow
    (MLFLOW_TRACKING_URI, the run mlflow_experiment / run_name) through the project's Tracker;
  - the metrics (infoprompt_ds.metrics.compute_metrics).

What differs (PEFT / the Trainer as a user gets them):
  - readout linear (encoders, e.g. MiniLM): AutoModelForSequenceClassification + TaskType.SEQ_CLS, i.e.
    the model's own head (BERT: the checkpoint's tanh pooler on [CLS], frozen, then a new, randomly
    initialised classifier, which PEFT trains with the prompt). Ours: a linear head on the pooled state
    (pooling auto: mean for all-MiniLM-L6-v2, the pooling it was trained with; its [CLS] pooler never was),
    its rows started from the label words' embeddings.
  - readout lm_label (decoders, e.g. SmolLM2): what PEFT's prompt-tuning tutorial does for causal LMs:
    TaskType.CAUSAL_LM, the input + cue followed by the label word's first token, the LM loss (softmax
    over the whole vocabulary) on that token only; the LM head stays frozen, only the prompt trains. The
    decision rule is ours: argmax over the C label words' first-token logits at the cue's last token. Ours:
    cross-entropy over the C label rows (copied from the LM head, trained with the prompt).
  - prompt init (cfg.prompt_init -> PromptTuningInit): vocab -> SAMPLE_VOCAB (any vocabulary row, specials
    included; ours: seeded ordinary tokens), random -> RANDOM (nn.Embedding's N(0, 1); ours: N(0, std of
    the vocabulary embeddings)), text -> TEXT (prompt_init_text, tokenized with the tokenizer's special
    tokens), labels -> TEXT of the label words (repeated to n tokens; ours: the label words' tokens, then
    vocabulary rows). Seeded with cfg.seed, but not the same values as ours.
  - data order: the Trainer's seeded RandomSampler, not our DistributedSampler order; the backbone's
    dropout is on in training (the Trainer's model.train()), ours runs the frozen backbone in eval mode.
  - no checkpoints, no export, no non-finite-step guard (the Trainer's own behaviour).
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infoprompt_ds.config import ConfigError, TrainConfig
from infoprompt_ds.config_load import parse_config  # noqa: E402
from infoprompt_ds.errors import exit_on_config_error  # noqa: E402

# our prompt_init -> PEFT's PromptTuningInit (see the docstring for how close each one is)
INIT = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM", "text": "TEXT", "labels": "TEXT"}
IGNORE = -100


def check(cfg: TrainConfig) -> None:
    """What PEFT prompt tuning cannot do the way our run would: refused before any weight loads."""
    if cfg.prompt_type != "static":
        raise ConfigError("prompt_type", "PEFT prompt tuning has one static prompt; use --prompt_type static")
    if cfg.vib_head:
        raise ConfigError("vib_head", "the PEFT arm uses the model's own head; use --vib_head false")
    if cfg.resume_from_checkpoint:
        raise ConfigError("resume_from_checkpoint", "the PEFT arm saves no checkpoints; rerun it instead")
    out = Path(cfg.output_dir)
    if (out / "metrics.json").exists():
        if not cfg.overwrite_output_dir:
            raise ConfigError("output_dir", f"{out} holds a finished run; pass --overwrite_output_dir true or "
                              f"another output_dir")
        (out / "metrics.json").unlink()  # a failed rerun must not leave the old result behind


def lm_label_split(split, word_ids: list[int]):
    """readout=lm_label as PEFT's causal-LM tutorial trains it: the templated input (ending with the cue)
    followed by the label word's first token, the loss on that token only."""
    def add_answer(row):
        answer = word_ids[row["labels"]]
        return {"input_ids": row["input_ids"] + [answer], "attention_mask": row["attention_mask"] + [1],
                "labels": [IGNORE] * len(row["input_ids"]) + [answer]}

    return split.map(add_answer)


def label_word_logits(word_ids: list[int]):
    """preprocess_logits_for_metrics for the causal LM: (B, n + L, V) logits -> (B, C), the label words'
    first-token logits at the position that predicts the answer token (the cue's last token; the n virtual
    tokens sit in front). Keeps one batch's vocabulary logits in memory, not the whole split's."""
    import torch

    words = torch.tensor(word_ids)

    def fn(logits, labels):
        logits = logits[0] if isinstance(logits, tuple) else logits
        n = logits.shape[1] - labels.shape[1]
        answer_pos = (labels != IGNORE).int().argmax(1)  # one answer token per row
        rows = torch.arange(labels.shape[0], device=labels.device)
        return logits[rows, n + answer_pos - 1][:, words.to(logits.device)]

    return fn


def run(cfg: TrainConfig, peft_type: str = "prompt") -> dict:
    from infoprompt_ds.env import setup_environment

    setup_environment()  # before torch and DeepSpeed are imported
    import torch
    import peft
    from peft import PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, DataCollatorForSeq2Seq,
                              DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments, set_seed)

    from infoprompt_ds.data.load import prepare_data
    from infoprompt_ds.runtime.distributed import gather_trainable, set_trainable
    from infoprompt_ds.runtime.ds_config import fill_ds_config, load_ds_config, resolve_ds_config
    from infoprompt_ds.internals import full_numel
    from infoprompt_ds.io import write_json_atomic
    from infoprompt_ds.metrics import check_metric, compute_metrics
    from infoprompt_ds.method.model import load_model_config, load_tokenizer
    from infoprompt_ds.backbone import resolve_model_path
    from infoprompt_ds.runtime.prepare import plan_steps
    from infoprompt_ds.runtime.process_group import unlink_deepspeed_shm
    from infoprompt_ds.data.readout import first_token
    from infoprompt_ds.tracking.run_metadata import run_name_for, run_tags
    from infoprompt_ds.tracking.client import Tracker
    from infoprompt_ds.tracking.store import check_tracking

    # --- checks and data: everything before a weight loads (bad input: one line, exit 2) ---------------
    check(cfg)
    check_tracking(cfg)
    ds_path = str(resolve_ds_config(cfg.deepspeed))
    ds_raw = load_ds_config(ds_path)
    model_config = load_model_config(cfg)
    tok = load_tokenizer(cfg)  # right padding: the prompt goes in front, the real tokens stay contiguous
    data = prepare_data(cfg, tok, model_config)
    task, readout = data.task, data.readout
    if task.type != "classification" or readout.kind == "cloze":
        raise ConfigError("readout" if readout.kind == "cloze" else "task_type",
                          f"the PEFT arm covers classification with readout linear (SEQ_CLS) or lm_label (CAUSAL_LM); "
                          f"this run is {task.type} with readout={readout.kind}")
    problem = check_metric(task.type, task.metric, len(data.label_names))
    if problem:
        raise ConfigError("metric_for_best_model", problem)
    _, total_steps = plan_steps(cfg, len(data.splits["train"]), 1)
    ours_ds = fill_ds_config(ds_raw, cfg, 1, total_steps, model_config.hidden_size)  # what train.py would run
    ours_ds.pop("steps_per_print", None)
    causal = readout.kind == "lm_label"
    cols = [c for c in ("input_ids", "attention_mask", "token_type_ids", "labels")
            if c in data.splits["train"].column_names and not (causal and c == "token_type_ids")]
    splits = {k: v.select_columns(cols) for k, v in data.splits.items()}
    word_ids = [first_token(tok, w) for w in task.words()] if causal else []
    if causal:
        splits = {k: lm_label_split(v, word_ids) for k, v in splits.items()}

    # --- model: TrainingArguments(deepspeed=...) first, so from_pretrained partitions under ZeRO-3 -----
    out = Path(cfg.output_dir)
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)
    on_gpu = torch.cuda.is_available()
    targs = TrainingArguments(
        output_dir=str(out / "hf_trainer"), deepspeed=ds_path, max_steps=total_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, warmup_steps=warmup,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,  # fill_ds_config's values
        bf16=cfg.bf16, fp16=cfg.fp16, use_cpu=not on_gpu, seed=cfg.seed,
        eval_strategy="steps", eval_steps=cfg.eval_steps, logging_steps=cfg.logging_steps,
        save_strategy="no", report_to=[], label_names=["labels"], remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=True)
    set_seed(cfg.seed)  # the new classifier (SEQ_CLS) and the prompt init draw from the global generator
    path = resolve_model_path(cfg.model_name_or_path)
    if causal:
        model = AutoModelForCausalLM.from_pretrained(path, config=model_config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(data.label_names))
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
    task_type = TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS
    if peft_type == "prefix":
        if not causal:  # PEFT's causal-LM path hands past_key_values on through **kwargs; no shim needed there
            accept_past_key_values(model)
        init = "PREFIX_RANDOM"  # PEFT's prefix tuning has one init (random embedding rows)
        pcfg = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=cfg.n_virtual_tokens)
    else:
        init = INIT[cfg.prompt_init]
        init_text = cfg.prompt_init_text if cfg.prompt_init == "text" else \
            " ".join(task.words() or []) if cfg.prompt_init == "labels" else None
        pcfg = PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.n_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit(init), prompt_tuning_init_text=init_text,
                                  tokenizer_name_or_path=path if init_text else None)
    model = get_peft_model(model, pcfg)
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)

    # --- tracking, best-prompt keeping ------------------------------------------------------------------
    tracker = Tracker(enabled=True)
    tracker.start(cfg.mlflow_experiment, cfg.output_dir, run_name_for(cfg), None,
                  {**run_tags(cfg), "method": f"peft_{peft_type}_tuning", "impl": "peft"})
    metric = task.metric
    state = {"best": None, "best_step": None, "weights": None}
    trainer = None

    class Track(TrainerCallback):
        def on_log(self, args, st, control, logs=None, **kw):
            if logs and "loss" in logs:
                tracker.log_metrics({"train/loss": logs["loss"], "train/lr": logs.get("learning_rate", 0.0)},
                                    st.global_step)

        def on_evaluate(self, args, st, control, metrics=None, **kw):
            if not metrics or f"eval_{metric}" not in metrics:  # the test evaluation after training
                return
            vals = {k[len("eval_"):]: v for k, v in metrics.items()
                    if k.startswith("eval_") and k[len("eval_"):] in ("loss", "accuracy", "macro_f1", "mcc", "f1")}
            tracker.log_metrics({f"eval/{k}": v for k, v in vals.items()}, st.global_step)
            if state["best"] is None or vals[metric] > state["best"]:
                state["best"], state["best_step"] = vals[metric], st.global_step
                state["weights"] = gather_trainable(trainer.model_wrapped)  # prompt (+ SEQ_CLS head), fp32
            print(f"[peft eval step {st.global_step}] {metric}={vals[metric]:.4f} "
                  f"(best {state['best']:.4f} @ {state['best_step']})", flush=True)

    def metrics_fn(pred):
        logits, labels = pred.predictions, pred.label_ids
        if causal:  # the class is the answer token's position in the label words
            answer = {t: c for c, t in enumerate(word_ids)}
            labels = [answer[int(row[row != IGNORE][0])] for row in labels]
        return compute_metrics(task.type, logits.argmax(-1).tolist(), list(labels), list(task.labels))

    collate = DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE) if causal else DataCollatorWithPadding(tok)
    status = "FAILED"
    try:
        tracker.log_params({**cfg.to_dict(), "impl": "peft", "peft_type": peft_type, "peft_version": peft.__version__,
                            "peft_task_type": TaskType(pcfg.task_type).value, "prompt_tuning_init": init,
                            "trainable_params": trainable, "total_steps": total_steps, "world_size": 1,
                            "n_train": len(splits["train"]), "n_validation": len(splits["validation"]),
                            "n_test": len(splits["test"])})
        trainer = Trainer(model=model, args=targs, train_dataset=splits["train"], eval_dataset=splits["validation"],
                          data_collator=collate, compute_metrics=metrics_fn, callbacks=[Track()],
                          preprocess_logits_for_metrics=label_word_logits(word_ids) if causal else None)
        trainer.train()
        weights = "last"
        if cfg.load_best_model_at_end and state["weights"] is not None:
            set_trainable(trainer.model_wrapped, state["weights"])
            weights = "best"
        test = {k[len("test_"):]: v for k, v in trainer.evaluate(splits["test"], metric_key_prefix="test").items()
                if k[len("test_"):] in ("accuracy", "macro_f1", "mcc", "f1")}
        tracker.log_metrics({f"test/{k}": v for k, v in test.items()}, total_steps)
        # the json as the Trainer filled and ran it (its eval_strategy="steps" also validates at the last step)
        hf_ds = dict(trainer.accelerator.state.deepspeed_plugin.hf_ds_config.config)
        hf_ds.pop("steps_per_print", None)  # logging only; the Trainer sets it to inf (not valid JSON)
        write_json_atomic(out / "ds_config.json", hf_ds)
        result = {"global_step": trainer.state.global_step, "best_step": state["best_step"],
                  f"best_validation_{metric}": state["best"], "test": test, "test_weights": weights,
                  "mlflow_run_id": tracker.run_id, "world_size": 1, "impl": "peft",
                  "peft": {"version": peft.__version__, "peft_type": peft_type, "task_type": TaskType(pcfg.task_type).value, "prompt_tuning_init": init,
                           "trainable_params": trainable},
                  "ds_config_vs_train_py": _diff(ours_ds, hf_ds)}
        print("[peft test] " + " ".join(f"{k}={v:.4f}" for k, v in test.items()), flush=True)
        write_json_atomic(out / "metrics.json", result)
        tracker.log_artifact(out / "metrics.json")
        status = "FINISHED"
        return result
    finally:
        tracker.end(status)
        shutil.rmtree(out / "hf_trainer", ignore_errors=True)  # save_strategy no: nothing of value there
        unlink_deepspeed_shm(0, 1)


def accept_past_key_values(model) -> None:
    """PEFT 0.21's prefix tuning passes its prefixes as `past_key_values` and refuses a model whose forward
    signature lacks that name ("Model does not support past key values which are required for prefix
    tuning"). transformers 5 renamed the argument `cache` and still takes the old name through
    deprecate_kwarg, and BERT's layers use a given cache in encoder self-attention too; only the name in the
    signature is missing. The one-line shim a user on these versions would write: a forward that names
    `past_key_values` and hands it on under the new name (SEQ_CLS only; tests/unit/test_benchmarks.py checks
    that the prefixes then reach the output)."""
    inner = model.forward

    def forward(*args, past_key_values=None, **kwargs):  # no functools.wraps: PEFT reads this signature
        return inner(*args, cache=past_key_values, **kwargs)

    model.forward = forward


def _diff(ours: dict, theirs: dict, prefix: str = "") -> dict:
    """Leaf values of two filled DeepSpeed jsons that differ: {dotted.key: [train.py's, Trainer's]}."""
    out = {}
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            out[f"{prefix}{key}"] = [a, b]
    return out


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    peft_type = "prompt"
    if "--peft_type" in argv:  # ours, not a TrainConfig field: taken out before the project's parser sees argv
        i = argv.index("--peft_type")
        peft_type = argv[i + 1] if i + 1 < len(argv) else ""
        del argv[i:i + 2]
    if peft_type not in ("prompt", "prefix"):
        exit_on_config_error(_bad_peft_type, peft_type)
    cfg = exit_on_config_error(parse_config, argv)
    return exit_on_config_error(run, cfg, peft_type)


def _bad_peft_type(value: str):
    raise ConfigError("peft_type", f"got {value!r}; use prompt (PEFT prompt tuning) or prefix (PEFT prefix tuning)")


if __name__ == "__main__":
    main()
