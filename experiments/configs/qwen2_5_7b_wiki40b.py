"""Paper-scale KOFF: Qwen2.5-7B (HF folder at model.path) on TFDS wiki40b/<lang> (array_record under data.data_dir; its Beam build needs TensorFlow,
build it elsewhere and copy the data dir, see docs/data.md).

Mesh data 4 x fsdp 2 x model 2 (v5p-32); run the same command on every host of the slice:

sparsemem run --config experiments/configs/qwen2_5_7b_wiki40b.py --set model.path=/path/to/Qwen2.5-7B --workdir /path/to/runs/qwen2_5_7b_wiki40b
"""

from sparsemem.experiment.paper import paper_config


def get_config():
    return paper_config("qwen2_5_7b_wiki40b", "Qwen2.5-7B", "wiki40b", mesh=(4, 2, 2))
