"""`sparsemem --help` builds every subcommand's parser without importing the heavy stack."""

import os
import pathlib
import subprocess
import sys

HEAVY = ("jax", "flax", "numpy", "orbax", "grain", "tensorflow_datasets", "tokenizers", "torch", "ml_collections")


def test_building_the_parser_imports_no_heavy_library():
    root = pathlib.Path(__file__).resolve().parents[1]
    code = ("import sys; from sparsemem import cli; cli.build_parser().format_help(); "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "", f"importing for --help loaded {result.stdout.strip()}"
