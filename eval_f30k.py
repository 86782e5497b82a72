"""Evaluate CODER checkpoints on Flickr30K: the 1,000-image test split.

python eval_f30k.py --checkpoint runs/f30k_.../best.pt [--data_path DIR] [--split ...] [--json OUT]
python eval_f30k.py --checkpoint a/best.pt b/best.pt     # ensemble: averaged similarities
python eval_f30k.py --checkpoint ... --sweep-mu           # choose mu on dev first
"""

import sys

from evaluation import main
from utils import cli_entry

if __name__ == "__main__":
    cli_entry(main)(sys.argv[1:], "f30k")
