"""Paper-scale KOFF: Qwen2.5-3B (HF folder at model.path) on TFDS wiki40b/<lang> (array_record under data.data_dir; its Beam build needs TensorFlow,
build it elsewhere and copy the data dir, see docs/data.md).

Mesh data 1 x fsdp 1 x model 4 (v5p-8); run the same command on every host of the slice:

sparsemem run --config experiments/configs/qwen2_5_3b_wiki40b.py --set model.path=/path/to/Qwen2.5-3B --workdir /path/to/runs/qwen2_5_3b_wiki40b
"""

from sparsemem.experiment.paper import paper_config


def get_config():
    return paper_config("qwen2_5_3b_wiki40b", "Qwen2.5-3B", "wiki40b", mesh=(1, 1, 4))
