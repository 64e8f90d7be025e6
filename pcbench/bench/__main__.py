"""``python -m pcbench.bench``: same as ``pcbench-bench``."""

from pcbench.cli.bench import main

raise SystemExit(main())
