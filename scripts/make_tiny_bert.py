"""Builds a small, randomly initialised BERT checkpoint folder whose WordPiece tokenizer is
trained on the texts of a shard split. The demo and tests use it where no pretrained BERT is
available; a real run points model.text.checkpoint at any local BERT folder instead.

    python scripts/make_tiny_bert.py --shards runs/demo/ad_shards/train --out runs/demo/tiny_bert
"""

from __future__ import annotations

import argparse

from models.text import make_tiny_bert_checkpoint
from shards.reader import read_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, help="a split folder of shards (training texts)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=2000)
    args = parser.parse_args()
    texts = read_texts(args.shards)
    if not texts:
        raise SystemExit(f"{args.shards}: the shards hold no texts")
    path = make_tiny_bert_checkpoint(
        args.out,
        texts,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        vocab_size=args.vocab_size,
    )
    print(
        f"tiny BERT ({args.layers} layers, hidden {args.hidden_size}) from {len(texts)} texts: {path}"
    )


if __name__ == "__main__":
    main()
