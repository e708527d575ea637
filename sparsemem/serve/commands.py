"""`sparsemem generate`: continue prompts with a model folder (default: the embedded Gemma-3-270M)."""

from __future__ import annotations

import argparse
import logging
import time

from sparsemem.checkpoints.hf import load_hf_checkpoint, load_tokenizer
from sparsemem.serve.generate import SamplingConfig, generate_text

log = logging.getLogger(__name__)


def _model_folder(model: str | None):
    if model:
        return model
    from sparsemem.checkpoints.gguf import demo_model_dir  # the demo extra is only needed for the default

    return demo_model_dir()


def generate(args: argparse.Namespace) -> int:
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              seed=args.seed)
    folder = _model_folder(args.model)
    start = time.perf_counter()
    log.info("loading %s", folder)
    model = load_hf_checkpoint(folder)
    tokenizer = load_tokenizer(folder, model.cfg)
    log.info("loaded in %.1fs; generating", time.perf_counter() - start)
    for prompt, continuation in zip(args.prompt, generate_text(model, tokenizer, args.prompt, sampling)):
        print(f"{prompt}{continuation}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="continue text prompts with a model",
                                   description=__doc__)
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text; repeat the flag for a batch of prompts")
    parser.add_argument("--model", help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json); "
                                        "default: the embedded Gemma-3-270M demo model")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=generate)
