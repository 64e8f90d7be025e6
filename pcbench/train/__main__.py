"""``python -m pcbench.train``: same as ``pcbench-train``."""

from pcbench.cli.train import train_main

raise SystemExit(train_main())
