"""The command line's process setup: `--help` imports no heavy library; compiled programs go to a disk cache."""

import os
import pathlib
import subprocess
import sys

HEAVY = ("jax", "flax", "numpy", "orbax", "grain", "tensorflow_datasets", "tokenizers", "torch", "ml_collections")


ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_python(code: str, **env_changes) -> str:
    """stdout of `code` in a fresh interpreter with this checkout first on the path (env entry None: unset)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout


def test_building_the_parser_imports_no_heavy_library():
    code = ("import sys; from sparsemem import cli; cli.build_parser().format_help(); "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    loaded = run_python(code).strip()
    assert loaded == "", f"importing for --help loaded {loaded}"


COMPILE = ("from sparsemem import cli; cli.use_compilation_cache(); import jax, jax.numpy as jnp; "
           "jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((8, 8))).block_until_ready()")


def test_compiled_programs_go_to_the_sparsemem_cache_unless_jax_is_told_otherwise(tmp_path):
    run_python(COMPILE, JAX_COMPILATION_CACHE_DIR=None, SPARSEMEM_CACHE=str(tmp_path / "sm"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    assert any((tmp_path / "sm" / "xla").iterdir())
    run_python(COMPILE, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "own"), SPARSEMEM_CACHE=str(tmp_path / "sm2"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    assert any((tmp_path / "own").iterdir()) and not (tmp_path / "sm2").exists()
