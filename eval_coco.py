"""Evaluate CODER checkpoints on MSCOCO: 1K (mean of 5 folds of testall) and 5K.

python eval_coco.py --checkpoint runs/coco_.../best.pt [--data_path DIR] [--split ...] [--json OUT]
python eval_coco.py --checkpoint a/best.pt b/best.pt     # ensemble: averaged similarities
python eval_coco.py --checkpoint ... --sweep-mu           # choose mu on dev first
"""

import sys

from evaluation import main
from utils import cli_entry

if __name__ == "__main__":
    cli_entry(main)(sys.argv[1:], "coco")
