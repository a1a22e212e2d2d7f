"""The method: soft prompt, MI estimators, the loss, and the model that joins them to the frozen backbone.

    prompt.init_values / SoftPrompt       the trainable prompt (static or per input) and its initialisations
    mi.*                                   the InfoNCE estimators (normalized, authors) and the VIB bottleneck
    loss.*  /  loss.Diagnostics            the loss assembled in one place, and its per-window diagnostics
    model.build_model(cfg, ...)            frozen backbone + prompt + read-out head (+ VIB, estimators), ZeRO-3 loading
"""
