"""Paper-scale KOFF: Qwen2.5-7B (HF folder at model.path) on the LibreOffice help corpus (`sparsemem data prepare --languages en-US,de,ru,ja`).

Mesh data 4 x fsdp 2 x model 2 (v5p-32); run the same command on every host of the slice:

sparsemem run --config experiments/configs/qwen2_5_7b_libreoffice.py --set model.path=/path/to/Qwen2.5-7B --workdir /path/to/runs/qwen2_5_7b_libreoffice
"""

from sparsemem.experiment.paper import paper_config


def get_config():
    return paper_config("qwen2_5_7b_libreoffice", "Qwen2.5-7B", "libreoffice_help", mesh=(4, 2, 2))
