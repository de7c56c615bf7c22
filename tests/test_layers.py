"""scripts/check_layers.py: the package's imports point down its layers, and no module
reaches into another's private names. The real tree must pass; planted violations fail."""

import importlib.util
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_layers", ROOT / "scripts/check_layers.py")
assert _spec is not None and _spec.loader is not None
check_layers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_layers)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "flashmath"
    for name, text in {"__init__.py": "", "dtypes.py": "", "softmax/__init__.py": "",
                       "attention/__init__.py": "", "lab/__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


@pytest.mark.parametrize(("files", "expected"), [
    ({"softmax/stable.py": "from flashmath.attention import tiled\n"}, "upward import"),
    ({"softmax/stable.py": "def f():\n    import flashmath.lab.runner\n"}, "upward import"),
    ({"attention/tiled.py": "from flashmath.softmax.stable import _rows\n"}, "private name _rows"),
    ({"softmax/stable.py": "", "attention/tiled.py":
      "from flashmath.softmax import stable\nx = stable._rows\n"}, "reads private name"),
    ({"attention/tiled.py": "import flashmath as fm\n"}, "facade"),
    ({"attention/tiled.py": "from flashmath import naive\n"}, "facade"),
    ({"conformance/__init__.py": "", "measure/__init__.py": "",
      "measure/cpu.py": "from flashmath.conformance import run\n"}, "sideways import"),
    ({"mystery.py": ""}, "has no layer"),
])
def test_planted_violations_are_found(tmp_path, files, expected):
    problems = check_layers.check_tree(_tree(tmp_path, files))
    assert any(expected in p for p in problems), problems


def test_downward_public_imports_pass(tmp_path):
    root = _tree(tmp_path, {
        "softmax/stable.py": "from flashmath.dtypes import as_dtype\n",
        "attention/tiled.py": "from flashmath.softmax.stable import softmax\n"
                              "from . import masks\n",
        "attention/masks.py": "",
        "lab/x.py": "import flashmath as fm\nfrom flashmath.attention import tiled\n",
    })
    assert check_layers.check_tree(root) == []
