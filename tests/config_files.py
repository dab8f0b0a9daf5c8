"""Compare config files as written by us and by the oracles, ignoring the writer's version keys.

The version keys (``_diffusers_version``, ``transformers_version``) name whichever release wrote
the file, so a new oracle release would change them; every other byte (key order, indentation,
values) must still be identical.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

VERSION_KEYS = ("_diffusers_version", "transformers_version")
_VERSION_LINE = re.compile(r'^\s*"(?:' + "|".join(VERSION_KEYS) + r')": "[^"]*",?\n', re.MULTILINE)


def without_versions(text: str) -> str:
    """``text`` (a JSON config file's contents) minus its version-key lines."""
    return _VERSION_LINE.sub("", text)


def assert_same_config_file(ours: Path, ref: Path) -> None:
    """The two files are the same bytes once the version lines are dropped, and parse to the same dict."""
    a, b = Path(ours).read_text(), Path(ref).read_text()
    assert without_versions(a) == without_versions(b), (ours, ref)
    da, db = json.loads(a), json.loads(b)
    for key in VERSION_KEYS:
        assert (key in da) == (key in db), key
        da.pop(key, None), db.pop(key, None)
    assert da == db
