"""Reading YAML strictly: a duplicate key is an error (PyYAML keeps the last one silently), and
every error is one line naming the file and line."""

from __future__ import annotations

from typing import Any

import yaml

from jax_eplb._errors import EplbInputError
from jax_eplb._files import read_text_file


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path, what: str = "YAML file") -> Any:
    """The parsed document of ``path`` (a regular text file)."""
    text = read_text_file(path, what, "YAML")
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise EplbInputError(f"{path}{where}: malformed YAML ({problem})") from None
