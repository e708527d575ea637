"""Paper-scale KOFF: Llama-3.2-3B (HF folder at model.path) on the LibreOffice help corpus (`sparsemem data prepare --languages en-US,de,ru,ja`).

Mesh data 1 x fsdp 1 x model 4 (v5p-8); run the same command on every host of the slice:

sparsemem run --config experiments/configs/llama3_2_3b_libreoffice.py --set model.path=/path/to/Llama-3.2-3B --workdir /path/to/runs/llama3_2_3b_libreoffice
"""

from sparsemem.experiment.paper import paper_config


def get_config():
    return paper_config("llama3_2_3b_libreoffice", "Llama-3.2-3B", "libreoffice_help", mesh=(1, 1, 4))
