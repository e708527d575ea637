"""Paper-scale KOFF: Llama-3.1-8B (HF folder at model.path) on TFDS wiki40b/<lang> (array_record under data.data_dir; its Beam build needs TensorFlow,
build it elsewhere and copy the data dir, see docs/data.md).

Mesh data 4 x fsdp 2 x model 2 (v5p-32); run the same command on every host of the slice:

sparsemem run --config experiments/configs/llama3_1_8b_wiki40b.py --set model.path=/path/to/Llama-3.1-8B --workdir /path/to/runs/llama3_1_8b_wiki40b
"""

from sparsemem.experiment.paper import paper_config


def get_config():
    return paper_config("llama3_1_8b_wiki40b", "Llama-3.1-8B", "wiki40b", mesh=(4, 2, 2))
