"""Paper-scale KOFF: Llama-3.2-3B (HF folder at model.path) on TFDS wiki40b/<lang> (array_record under data.data_dir; its Beam build needs TensorFlow,
build it elsewhere and copy the data dir, see docs/data.md).

Mesh data 1 x fsdp 1 x model 4 (v5p-8); run the same command on every host of the slice:

sparsemem run --config experiments/configs/llama3_2_3b_wiki40b.py --set model.path=/path/to/Llama-3.2-3B --workdir /path/to/runs/llama3_2_3b_wiki40b
"""

from sparsemem.experiment.paper import paper_config


def get_config():
    return paper_config("llama3_2_3b_wiki40b", "Llama-3.2-3B", "wiki40b", mesh=(1, 1, 4))
