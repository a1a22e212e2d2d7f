"""Config-file parsers that refuse what the plain ones accept silently: a key given twice (YAML and JSON
keep the last one), and a format the file's suffix does not name (.toml used to be parsed as JSON)."""

from __future__ import annotations

import json
from typing import Any


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} is given twice")
        out[key] = value
    return out


def load_json(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_no_duplicates)


def load_yaml(text: str) -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node):
        keys = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)
            if key in keys:
                raise ValueError(f"key {key!r} is given twice (line {key_node.start_mark.line + 1})")
            keys.add(key)
        return loader.construct_mapping(node)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=Loader)


def load_toml(text: str) -> Any:
    import tomllib  # duplicate keys are already an error in TOML

    return tomllib.loads(text)


LOADERS = {".json": load_json, ".yaml": load_yaml, ".yml": load_yaml, ".toml": load_toml}
