"""Convert a pickled checkpoint to safetensors, once, with the restricted unpickler:

    python -m ldmcore.interop.convert model.ckpt model.safetensors

Only the tensors are kept (a Lightning checkpoint's ``state_dict``); training state is dropped.
Running this is the explicit consent to read a pickle; it still executes nothing from the file.
"""

from __future__ import annotations

import argparse

from .safe_pickle import convert


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldmcore.interop.convert", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a pickled checkpoint (.ckpt, .pt, .pth, .bin)")
    parser.add_argument("target", help="the .safetensors file to write")
    args = parser.parse_args(argv)
    print(convert(args.source, args.target))


if __name__ == "__main__":
    main()
