"""Data: from a preset, hub name or local files to tokenized splits and a resolved Task.

    tasks.Task / tasks.resolve_task        the task family, columns, label names and words, metric; presets, readers
    readout.resolve / readout.encode       cloze templates and lm_label cues on token ids, the z position
    load.prepare_data(cfg, tokenizer)      load, split, k-shot sample, tokenize -> PreparedData(splits, task)
    checks.*                               what the data must satisfy, checked before any weight loads
"""
