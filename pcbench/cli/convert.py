"""``pcbench-convert``: turn a reference implementation's checkpoint into a pcbench checkpoint."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from pcbench.cli._kv import UsageError, fail, parse_kv

PROG = "pcbench-convert"
USAGE = f"""usage: {PROG} src=<checkpoint> source=<kind> model=<model config> out=<file.pt>
       {PROG} list

Converts the weights of a published or self-trained reference checkpoint (yanx27's PointNet++, PCT_Pytorch) into
a pcbench checkpoint that loads with torch.load(weights_only=True) and with
pcbench.models.create_model(<model>, in_channels, num_classes, weights=<out>). Every key and shape must map: a
leftover or missing key is an error naming it. The output records the source file's sha256 and the key mapping.
`list` prints the supported (source, model) pairs."""
KEYS = {
    "src": "the reference checkpoint file",
    "source": "which code wrote it (pcbench-convert list)",
    "model": "the pcbench model config it converts to (conf/model/<model>.yaml)",
    "out": "the pcbench checkpoint to write (atomically)",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pcbench-convert``."""
    from pcbench.models.convert import CONVERTERS, SOURCES, ConversionError, convert_checkpoint  # noqa: PLC0415

    try:
        args, words = parse_kv(sys.argv[1:] if argv is None else argv, KEYS, USAGE)
        if words == ["list"]:
            for source, model in sorted(CONVERTERS):
                print(f"{source:12s} -> {model:20s} {SOURCES[source]}")
            return 0
        if words:
            raise UsageError(f"unexpected words {words}; give src= source= model= out= (see --help)")
        absent = [k for k in KEYS if k not in args]
        if absent:
            raise UsageError(f"missing {', '.join(k + '=' for k in absent)} (see --help)")
        state = convert_checkpoint(args["src"], args["source"], args["model"])
    except (UsageError, ConversionError, ValueError) as err:
        return fail(PROG, str(err))
    import torch  # noqa: PLC0415

    from pcbench.io import atomic_path  # noqa: PLC0415

    out = Path(args["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    print(f"written: {out} ({args['model']}, in_channels={state['in_channels']}, num_classes={state['num_classes']}, "
          f"{len(state['model'])} tensors from {len(state['source']['mapping'])} source keys, "
          f"source sha256 {state['source']['sha256']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
