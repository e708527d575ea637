"""Paper-scale KOFF: Llama-3.1-8B (HF folder at model.path) on the LibreOffice help corpus (`sparsemem data prepare --languages en-US,de,ru,ja`).

Mesh data 4 x fsdp 2 x model 2 (v5p-32); run the same command on every host of the slice:

sparsemem run --config experiments/configs/llama3_1_8b_libreoffice.py --set model.path=/path/to/Llama-3.1-8B --workdir /path/to/runs/llama3_1_8b_libreoffice
"""

from sparsemem.experiment.paper import paper_config


def get_config():
    return paper_config("llama3_1_8b_libreoffice", "Llama-3.1-8B", "libreoffice_help", mesh=(4, 2, 2))
