"""Build the fused injection op's C++ library ahead of time (or check that it is built) and print where.

    python launch/build_kernels.py                     # once per torch install, into ~/.cache/llmrec
    python launch/build_kernels.py --dir /shared/kernels   # once into a folder that every node reads

Nodes that read the same folder, with the same torch and Python, then load it without a compiler
(set LLMREC_KERNEL_DIR there). How a build is locked and cached: trainer/model/kernels/build.py.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from trainer.model.kernels.cpu import NoCompiler, load_library  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="root folder of the build (default: $LLMREC_KERNEL_DIR, else "
                                      "$TORCH_EXTENSIONS_DIR, else ~/.cache/llmrec)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.dir:
        os.environ["LLMREC_KERNEL_DIR"] = os.path.abspath(args.dir)
    try:
        lib = load_library()
    except (NoCompiler, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    w, b = torch.arange(12.0).reshape(4, 3), torch.full((1, 3), -1.0)  # the op runs: a row from each side
    out = torch.ops.llmrec.inject(torch.tensor([[2, 0]]), w, torch.tensor([[-1, 0]]), b, -1)
    assert torch.equal(out, torch.stack([w[2], b[0]])[None]), out
    print(f"fused injection op ready: {lib}")
    print(f"other machines with torch {torch.__version__} and Python {sys.version_info.major}.{sys.version_info.minor} "
          f"load it without a compiler with LLMREC_KERNEL_DIR={os.path.dirname(os.path.dirname(lib))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
